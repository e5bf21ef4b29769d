"""What reaches the console: the progress bar and the run's own messages; what the libraries say goes to
output_dir/logs/ (all of it on the console instead with `logging.verbose: true`).

Each actor process points its stdout and stderr (file descriptors, so vLLM's and torch's C++ warnings too) at
logs/<role>.log from the first line of its constructor; Ray no longer forwards worker output to the driver.
On the driver, the loggers of Ray, transformers, datasets and the hub, and Python warnings, write to
logs/driver.log, and the libraries' progress bars are off while the run lasts. A run that stops for a reason
the user can act on (`RunStopped`) leaves its traceback in logs/driver.log, so the console shows its message.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
import traceback
from contextlib import ExitStack, contextmanager
from pathlib import Path

from raylign.common.config import RunConfig, RunStopped

LIBRARY_LOGGERS = ("ray", "transformers", "datasets", "huggingface_hub", "peft", "torch", "vllm", "py.warnings")


def actor_log_dir(config: RunConfig) -> str | None:
    """Where this run's actors write their output (absolute: an actor's working directory is not the driver's);
    None under logging.verbose, which leaves it to Ray (forwarded to the console)."""
    return None if config.logging.verbose else str((Path(config.output_dir) / "logs").resolve())


def remote_actor(cls: type, role: str, log_dir: str | None):
    """`ray.remote(cls)` whose actors write their output to log_dir/<role>.log (None: to Ray's worker logs) and
    can be reset in place for another run (cluster/warm_actors.py)."""
    import ray

    from raylign.cluster.warm_actors import arguments_after_reset

    class Actor(cls):
        def __init__(self, *args, **kwargs):
            # Ray reconstructs a crashed actor with its creation arguments; a reset one comes back as it was reset.
            target, args, kwargs = arguments_after_reset() or (log_dir, args, kwargs)
            if target is not None:
                write_output_to(os.path.join(target, f"{role}.log"), cls.__name__)
            cls.__init__(self, *args, **kwargs)

        def reset(self, new_log_dir: str | None, args: tuple, kwargs: dict) -> None:
            """Become the actor `cls(*args, **kwargs)` would be, in this process: the class's own
            `reset_in_place` where it decides what to keep (an engine), else a fresh `__init__` that keeps only
            the attributes the class names in KEPT_ON_RESET (the data-parallel group it joined)."""
            if new_log_dir is not None:
                write_output_to(os.path.join(new_log_dir, f"{role}.log"), cls.__name__)
            if hasattr(cls, "reset_in_place"):
                cls.reset_in_place(self, *args, **kwargs)
                return
            kept = {name: self.__dict__[name] for name in getattr(cls, "KEPT_ON_RESET", ()) if name in self.__dict__}
            self.__dict__.clear()
            gc.collect()
            cls.__init__(self, *args, **kwargs)
            self.__dict__.update(kept)

    Actor.__name__ = cls.__name__  # how Ray names the actor in its messages
    return ray.remote(Actor)


def write_output_to(path: str, name: str) -> None:
    """Point this process's stdout and stderr at `path` (appending: a restarted actor continues the file)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        # output_dir is not writable from this node (no shared storage): the output stays in Ray's worker logs.
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    print(f"---- {name} (pid {os.getpid()}) started {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)


@contextmanager
def run_console(config: RunConfig, output_dir: Path):
    """The driver's side of a run: library output to logs/driver.log (unless logging.verbose), and a
    `RunStopped` leaving its traceback there."""
    log_file = output_dir / "logs" / "driver.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if not config.logging.verbose:
            stack.enter_context(libraries_to(log_file))
        try:
            yield
        except RunStopped as stop:
            with log_file.open("a") as f:
                traceback.print_exc(file=f)
            stop.log_file = str(log_file)
            raise


@contextmanager
def libraries_to(log_file: Path):
    """While inside: the libraries' loggers and Python warnings write to `log_file`, their progress bars are off."""
    import datasets.utils as data_utils
    import huggingface_hub.utils as hub
    import transformers

    # transformers adds its console handler on first use; adding it now keeps it from coming back inside.
    transformers.utils.logging.get_logger()
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in LIBRARY_LOGGERS}
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).handlers = [handler]
        logging.getLogger(name).propagate = False
    logging.captureWarnings(True)
    # transformers switches the hub's bars along with its own, so it comes first and the hub's own state after.
    bars = [(transformers.utils.logging.is_progress_bar_enabled(), transformers.utils.logging.disable_progress_bar,
             transformers.utils.logging.enable_progress_bar),
            (not hub.are_progress_bars_disabled(), hub.disable_progress_bars, hub.enable_progress_bars),
            (not data_utils.are_progress_bars_disabled(), data_utils.disable_progress_bars, data_utils.enable_progress_bars)]
    for _, disable, _ in bars:
        disable()
    try:
        yield
    finally:
        for enabled, disable, enable in bars:
            (enable if enabled else disable)()
        logging.captureWarnings(False)
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers = handlers
            logging.getLogger(name).propagate = propagate
        handler.close()
