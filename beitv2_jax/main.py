"""Entry point: ``python -m beitv2_jax.main --config configs/<name>.py --workdir DIR [--config.key=value ...]``.

``--config`` also takes a recipe name (``demo``, ``beitv2_demo``, ``finetune_base:300``): the file of that name
shipped with the package (``configs/`` in the source tree, ``beitv2_jax.configs`` when installed).

The config's ``task`` field picks the job (``vqkd``, ``pretrain``, ``demo``, ...); each task lives in
``beitv2_jax/train/tasks/<task>.py`` and exposes ``run(config, workdir)``. Bad flags (unknown override keys, a
missing config file, values of the wrong type) and invalid configs (``validate.py``, checked before any compute) end
the program with one line on stderr and exit code 2. SIGTERM and Ctrl-C save a checkpoint at the next step and
exit 0 (run the same command to resume; Ctrl-C outside the training steps or pressed twice exits 130 at once); a
run stopped by the non-finite guard or the divergence detector, an unwritable final checkpoint or broken data exits
1 with one line. A workdir that another run holds (``train/workdir_lock.py``), that cannot be written or that is a
file, and a checkpoint of another config end with one line and exit code 2.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
import time

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/<name>.py file (get_config()) or a packaged recipe "
                                "name (demo, finetune_base:300, ...).",
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


def _config_file(argv) -> str:
    """The ``--config`` value in ``argv`` (for messages)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return "?"


def _override_path(key: str, argv) -> str:
    """The dotted path of the ``--config.*`` override that names ``key`` (``key`` itself if none does)."""
    for arg in argv:
        if arg.startswith("--config."):
            path = arg[len("--config."):].split("=", 1)[0]
            if key in path.split("."):
                return path
    return key


def _exit_now(line: str, code: int) -> None:
    """Print ``line`` last and leave at once. After a failed save orbax's abandoned background writes go on logging
    tracebacks (and their threads print uncaught errors such as "Event loop is closed"), also during interpreter
    shutdown; logging is stopped (its handlers' locks held, so no record is half-written around this line), every
    other writer to stdout/stderr is sent to /dev/null, and the process ends without the shutdown. What is kept is on
    disk already."""
    import logging as std_logging

    std_logging.disable(std_logging.CRITICAL)
    for handler in std_logging.getLogger().handlers:
        handler.acquire()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    # Other threads (an abandoned async save's event loop, C++ loggers) may still write to fd 2: they are pointed at
    # /dev/null first, and the line goes to a private copy of the real stderr, so it is the last one there.
    real_stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.dup2(devnull, 1)
    time.sleep(0.05)  # a write to the old fd 2 already inside the kernel finishes before the line
    os.write(real_stderr, (line + "\n").encode())
    os._exit(code)


def _explain_flag_error(error: BaseException, argv=()) -> str:
    """One line for a failure to load the config file or apply an override."""
    config_file = _config_file(argv)
    text = str(error)
    if isinstance(error, SyntaxError):
        return f"cannot load config file {config_file!r}: {error.msg} (line {error.lineno})"
    if "has no attribute 'get_config'" in text:
        return f"config file {config_file!r} has no get_config() function returning an ml_collections.ConfigDict"
    if "Error whilst parsing config file" in text:  # get_config() raised: its last traceback line says what
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        return f"cannot load config file {config_file!r}: get_config() raised {lines[-1] if lines else text}"
    if isinstance(error, (AttributeError, KeyError)):
        unescaped = text.replace("\\n", "\n").replace("\\'", "'")
        key = re.search(r"[A-Za-z_][A-Za-z0-9_]*", unescaped)
        hint = re.search(r'Did you mean "([^"]+)"', unescaped)
        if key:
            path = _override_path(key.group(0), argv)
            suggestion = f' (did you mean "{hint.group(1)}"?)' if hint else ""
            return (f"unknown config key 'config.{path}' in --config.{path}{suggestion}; an override must name an "
                    f"existing key of the config file")
    return " ".join(text.split())


def packaged_config_argv(argv):
    """``--config NAME`` (a recipe shipped with the package, e.g. ``demo``) → ``--config <its file>``."""
    from beitv2_jax import recipes

    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + recipes.resolve_config_arg(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = recipes.resolve_config_arg(out[i + 1])
    return out


def parse_flags(argv):
    """absl flag parsing that turns config errors into one readable line instead of a traceback."""
    argv = packaged_config_argv(argv)
    try:
        return FLAGS(argv)
    except flags.Error as e:
        cause = e.__cause__ or e.__context__
        _die(_explain_flag_error(cause, argv) if isinstance(cause, (AttributeError, KeyError, SyntaxError))
             or "Error whilst parsing config file" in str(e) else str(e))
    except Exception as e:  # noqa: BLE001 - a broken config file can raise anything while it is imported
        _die(_explain_flag_error(e, argv))


def load_config() -> ml_collections.ConfigDict:
    """The parsed ``--config`` (fails with one line if the file is missing or broken)."""
    config = FLAGS.config
    if config is None:
        _die("--config is required, e.g. --config configs/demo.py")
    if not isinstance(config, ml_collections.ConfigDict):
        filename = flags.FLAGS["config"].config_filename
        if not os.path.isfile(filename.split(":", 1)[0]):
            _die(f"config file {filename!r} does not exist (give a path such as configs/demo.py or a recipe name: "
                 f"{', '.join(recipes_names())})")
        try:
            config.task  # an _ErrorConfig re-raises the loading error here
        except Exception as e:  # noqa: BLE001 - any loading failure gets the same one-line treatment
            _die(f"cannot load config file {filename!r}: {' '.join(str(e).split())}")
        _die(f"config file did not return an ml_collections.ConfigDict: {type(config).__name__}")
    return config


def recipes_names() -> list:
    from beitv2_jax import recipes

    return recipes.recipe_names()


class _QuietLibraries:
    """Drop INFO chatter of orbax/grain/jax from the log (warnings and errors still pass)."""

    def filter(self, record) -> bool:
        noisy = any(part in record.pathname for part in ("/orbax/", "/grain/", "/jax/", "/jaxlib/", "/tensorflow_datasets/"))
        return record.levelno >= 30 or not noisy


def check_local_workdir(workdir: str) -> None:
    """A local ``--workdir`` must be a directory this process can write (created if missing)."""
    import tempfile

    from beitv2_jax import storage

    if storage.is_remote(workdir):
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        _die(f"--workdir {workdir} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        _die(f"--workdir {workdir} cannot be written ({e.strerror or e})")


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
    check_local_workdir(FLAGS.workdir)
    from beitv2_jax import distributed, runtime

    runtime.CLOCK.begin()  # goodput counts from here
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from beitv2_jax import validate  # imported late: the config must parse before anything heavy loads
    try:
        validate.validate_config(config, FLAGS.workdir)
    except validate.ConfigError as e:
        _die(str(e))
    try:
        runtime.setup_compilation_cache(config.get("compilation_cache_dir", ""), FLAGS.workdir)
    except OSError as e:
        _die(f"config.compilation_cache_dir: {e}")
    runtime.COMPILE_STATS.track()
    run_reporting_outcome(config, FLAGS.workdir)


def run_reporting_outcome(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Run the task; a preemption stop exits 0, known failures end with one line on stderr and exit code 1."""
    from beitv2_jax import runtime, validate
    from beitv2_jax.convert import inputs, torch_io
    from beitv2_jax.data import transforms
    from beitv2_jax.train import checkpoint, loop, workdir_lock

    try:
        run_task(config, workdir)
        logging.info("compilation: %s", runtime.COMPILE_STATS.summary())
    except loop.Preempted as e:
        logging.info("compilation: %s", runtime.COMPILE_STATS.summary())
        logging.warning("%s", e)  # the last line: how to resume
        sys.exit(0)
    except (validate.ConfigError, workdir_lock.WorkdirBusyError, checkpoint.IncompatibleCheckpointError,
            torch_io.MissingTorchError, inputs.FormatError) as e:  # a .pth without torch, an undetectable format
        _die(str(e))
    except (loop.NonFiniteError, checkpoint.CheckpointError, transforms.BadDataError) as e:
        _exit_now(f"error: {' '.join(str(e).split())}", code=1)
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (loading, evaluation) or pressed twice
        _exit_now("interrupted (Ctrl-C): stopped without saving; run the same command again to resume from the "
                  "newest checkpoint", code=130)


if __name__ == "__main__":
    from beitv2_jax import hostmem

    hostmem.restart_with_huge_pages()  # glibc reads GLIBC_TUNABLES at start: see hostmem
    app.run(main, flags_parser=parse_flags)
