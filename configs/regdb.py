"""RegDB: ResNet-50 at 288x144, one model per trial, both test directions.

Command (trial 3; the released preset can be combined: `:trial=3,released_code`):
  python run.py --config=configs/regdb.py:trial=3 --workdir=workdirs/regdb_t3
The reported number, the mean over trials 1..10, each trained on its own training split, in one
command (each trial in <workdir>/trial_<t>/, resumed trial by trial; the table in
<workdir>/trials.md and trials.json):
  python run.py --config=configs/regdb.py:trials=all --workdir=workdirs/regdb

Needs the dataset at data/RegDB (see data/README.md). Expected cost and numbers: not yet measured with this
implementation. Published (paper abstract): rank-1 94.83 (direction not stated).
"""
from configs import base


ALL_TRIALS = tuple(range(1, 11))


def parse_arg(arg):
  """Splits 'trial=3,released_code' into (trial, preset); 'trials=all' gives trial None (every
  trial, ALL_TRIALS)."""
  trial, preset = 1, None
  for token in filter(None, (arg or "").split(",")):
    if token == "trials=all":
      trial = None
    elif token.startswith("trial="):
      value = token.split("=", 1)[1]
      if not value.isdigit() or not 1 <= int(value) <= 10:
        raise ValueError(f"--config=configs/regdb.py:{arg}: trial must be 1..10, got {value!r}")
      trial = int(value)
    else:
      preset = token
  return trial, preset


def get_config(arg=None):
  """RegDB config; `arg` = 'trial=N' and/or a preset name, comma-separated."""
  trial, preset = parse_arg(arg)
  config = base.get_config(preset)
  config.data.dataset = "regdb"
  config.data.root = "data/RegDB"
  config.data.trial = trial or 1
  config.data.trials = ALL_TRIALS if trial is None else ()
  config.data.image_height = 288
  config.data.image_width = 144
  config.data.images_per_id = 5
  config.teacher.decay_epochs = (30, 60)
  # No CutSwap and no adaptive gray on RegDB: its dataset spec's augmentation recipe says so.
  return config
