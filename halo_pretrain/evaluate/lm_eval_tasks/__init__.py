"""Offline lm-evaluation-harness tasks over jsonl files shipped here: `halo_smoke` (cloze, choice, recall).

They check that an export runs through the harness's three request types (loglikelihood, multiple
choice, generation) with no download; they are far too small to rank models. Pass this folder to
lm_eval as --include_path (`python -m halo_pretrain.evaluate.lm_eval_tasks` prints it).
"""

from pathlib import Path

PATH = Path(__file__).resolve().parent
TASKS = ("halo_smoke_cloze", "halo_smoke_choice", "halo_smoke_recall")
