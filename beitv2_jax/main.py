"""Entry point: ``python -m beitv2_jax.main --config configs/<name>.py --workdir DIR [--config.key=value ...]``.

The config's ``task`` field picks the job (``vqkd``, ``pretrain``, ``demo``, ...); each task lives in
``beitv2_jax/train/tasks/<task>.py`` and exposes ``run(config, workdir)``. Bad flags (unknown override keys, a
missing config file, values of the wrong type) and invalid configs (``validate.py``, checked before any compute) end
the program with one line on stderr and exit code 2. SIGTERM saves a checkpoint at the next step and exits 0 (run
the same command to resume); a run stopped by the non-finite guard, an unwritable final checkpoint or broken data
exits 1 with one line.
"""
from __future__ import annotations

import importlib
import re
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/<name>.py file (get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs of this run.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 for a multi-process run (optional on "
                    "TPU pods and SLURM, where it is detected).")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")

TASKS = ("vqkd", "pretrain", "ibot", "demo", "finetune", "linear_probe", "knn", "segment")


def _die(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _explain_flag_error(error: BaseException) -> str:
    text = str(error).strip().strip('"').strip("'")
    match = re.search(r"'([^']+)'", str(error))
    if isinstance(error, (AttributeError, KeyError)) and match:
        return f"unknown config key {match.group(1)!r} in a --config.* override (check the spelling; " \
               f"`--config.<section>.<key>=value` must name an existing key of the config file)"
    return text


def parse_flags(argv):
    """absl flag parsing that turns config errors into one readable line instead of a traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _die(_explain_flag_error(e.__cause__ or e) if isinstance(e.__cause__, (AttributeError, KeyError))
             else str(e))
    except (AttributeError, KeyError, ValueError, TypeError) as e:
        _die(_explain_flag_error(e))


def load_config() -> ml_collections.ConfigDict:
    """The parsed ``--config`` (fails with one line if the file is missing or broken)."""
    config = FLAGS.config
    if config is None:
        _die("--config is required, e.g. --config configs/demo.py")
    if not isinstance(config, ml_collections.ConfigDict):
        try:
            config.task  # an _ErrorConfig re-raises the loading error here
        except Exception as e:  # noqa: BLE001 - any loading failure gets the same one-line treatment
            _die(f"cannot load config file {flags.FLAGS['config'].config_filename!r}: {e}")
        _die(f"config file did not return an ml_collections.ConfigDict: {type(config).__name__}")
    return config


class _QuietLibraries:
    """Drop INFO chatter of orbax/grain/jax from the log (warnings and errors still pass)."""

    def filter(self, record) -> bool:
        noisy = any(part in record.pathname for part in ("/orbax/", "/grain/", "/jax/", "/jaxlib/", "/tensorflow_datasets/"))
        return record.levelno >= 30 or not noisy


def run_task(config: ml_collections.ConfigDict, workdir: str):
    task = config.get("task")
    if task not in TASKS:
        _die(f"config.task must be one of {TASKS}, got {task!r}")
    module = importlib.import_module(f"beitv2_jax.train.tasks.{task}")
    return module.run(config, workdir)


def main(argv):
    if len(argv) > 1:
        _die(f"unexpected arguments: {' '.join(argv[1:])}")
    config = load_config()
    if not FLAGS.workdir:
        _die("--workdir is required")
    from beitv2_jax import distributed

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from beitv2_jax import validate  # imported late: the config must parse before anything heavy loads
    try:
        validate.validate_config(config, FLAGS.workdir)
    except validate.ConfigError as e:
        _die(str(e))
    run_reporting_outcome(config, FLAGS.workdir)


def run_reporting_outcome(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Run the task; a preemption stop exits 0, known failures end with one line on stderr and exit code 1."""
    from beitv2_jax import validate
    from beitv2_jax.data import transforms
    from beitv2_jax.train import checkpoint, loop

    try:
        run_task(config, workdir)
    except loop.Preempted as e:
        logging.warning("%s", e)
        sys.exit(0)
    except validate.ConfigError as e:
        _die(str(e))
    except (loop.NonFiniteError, checkpoint.CheckpointError, transforms.BadDataError) as e:
        _die(str(e), code=1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
