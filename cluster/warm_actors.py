"""Actors kept between the runs of one process: the seeds of a multi-seed run, the stages of a pipeline.

Starting an actor costs seconds here (importing torch, transformers and peft, loading the model) and a vLLM
engine tens of seconds on a GPU, which a 2-step seed run or a small pipeline stage pays again and again. Inside
`keeping_actors()` a finished run puts its actors on a shelf instead of stopping them, and the next run that
asks for actors of the same role and shape (count, resources, engine) takes them and resets them in place:
`reset` makes the process the actor `__init__` with the new arguments would have built (cluster/console.py),
so a run on kept actors computes what a run on fresh ones computes (tests/test_warm_actors.py).

A kept actor that Ray restarts after a crash must come back as the actor it was reset to, not as the one it
was created as: its current arguments are written to Ray's key-value store before every reset, and its
constructor reads them there when Ray reconstructs it. Idle actors still hold their placement group, so a
placement group that cannot be reserved at once frees the shelf first (`reserve`); whatever is left is
stopped when `keeping_actors()` ends.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Hashable
from contextlib import contextmanager
from dataclasses import dataclass

KV_NAMESPACE = "raylign-actor-args"
_shelf: "Shelf | None" = None


@dataclass
class KeptGroup:
    """One role's actors as a run left them: their placement group and the actor handles, in rank order."""

    key: Hashable
    placement: object
    actors: list


class Shelf:
    def __init__(self):
        self.idle: list[KeptGroup] = []
        self.reused = 0  # groups handed to a later run (for tests and logs)

    def take(self, key: Hashable) -> KeptGroup | None:
        """An idle group of this shape whose actors all still answer, or None."""
        for group in list(self.idle):
            if group.key == key:
                self.idle.remove(group)
                if alive(group.actors):
                    self.reused += 1
                    return group
                stop(group)
        return None

    def put(self, group: KeptGroup) -> None:
        """Keep `group`, stopping an idle group of the same role (the first item of the key): at most one idle
        group per role holds resources."""
        for other in [g for g in self.idle if g.key[0] == group.key[0]]:
            self.idle.remove(other)
            stop(other)
        self.idle.append(group)

    def release_all(self) -> bool:
        """Stop every idle group; whether there was one."""
        had_any = bool(self.idle)
        while self.idle:
            stop(self.idle.pop())
        return had_any


@contextmanager
def keeping_actors(own: bool = False):
    """Within this block, runs hand their actors on to the next run of the same shape; every kept actor is
    stopped when the block ends. A nested block shares the outer block's shelf, unless `own`: then it has a
    shelf of its own for as long as it lasts (its runs neither take nor leave actors on the outer one)."""
    global _shelf
    if _shelf is not None and not own:
        yield _shelf
        return
    outer, _shelf = _shelf, Shelf()
    try:
        yield _shelf
    finally:
        shelf, _shelf = _shelf, outer
        shelf.release_all()


def start_or_reuse(key: Hashable, start: Callable[[], tuple[object, list]], reset_args: list[tuple[str | None, tuple, dict]]) -> tuple[object, list]:
    """A role's placement group and actors: a kept group of shape `key`, reset to `reset_args` (per actor:
    log_dir, args, kwargs), else `start()`'s fresh one."""
    import ray

    group = _shelf.take(key) if _shelf is not None and key is not None else None
    if group is None:
        return start()
    for actor, arguments in zip(group.actors, reset_args, strict=True):
        remember_arguments(actor, arguments)
    ray.get([actor.reset.remote(*arguments) for actor, arguments in zip(group.actors, reset_args)])
    return group.placement, group.actors


def keep_or_stop(key: Hashable | None, placement, actors: list, restarts: int = 0) -> None:
    """At the end of a run: shelve the group inside `keeping_actors()`, else stop it. Never kept: key None, a
    group with a dead actor, and one whose actors Ray restarted (`restarts` > 0: they used some of their
    max_restarts, which count over an actor's life, so the next run gets fresh ones)."""
    group = KeptGroup(key, placement, actors)
    if _shelf is not None and key is not None and restarts == 0 and alive(actors):
        _shelf.put(group)
    else:
        stop(group)


def reserve(placement_group) -> None:
    """Wait until `placement_group` is reserved; idle kept actors are stopped first when it cannot be at once."""
    import ray

    ready = placement_group.ready()
    if _shelf is not None and _shelf.idle:
        done, _ = ray.wait([ready], timeout=2.0)
        if not done:
            _shelf.release_all()
    ray.get(ready)


def make_room() -> None:
    """Stop every kept actor (before reserving resources outside a placement group, where `reserve` cannot help)."""
    if _shelf is not None:
        _shelf.release_all()


def remember_arguments(actor, arguments: tuple[str | None, tuple, dict]) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(actor._actor_id.hex(), pickle.dumps(arguments), overwrite=True, namespace=KV_NAMESPACE)


def arguments_after_reset() -> tuple[str | None, tuple, dict] | None:
    """In an actor's constructor: the arguments of its last reset when Ray is reconstructing it, else None."""
    import ray
    from ray.experimental import internal_kv

    context = ray.get_runtime_context()
    if not context.was_current_actor_reconstructed:
        return None
    stored = internal_kv._internal_kv_get(context.get_actor_id(), namespace=KV_NAMESPACE)
    return None if stored is None else pickle.loads(stored)


def alive(actors: list) -> bool:
    import ray

    try:
        ray.get([actor.__ray_ready__.remote() for actor in actors], timeout=30)
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False


def stop(group: KeptGroup) -> None:
    import ray
    from ray.experimental import internal_kv
    from ray.util.placement_group import remove_placement_group

    for actor in group.actors:
        ray.kill(actor)
        internal_kv._internal_kv_del(actor._actor_id.hex(), namespace=KV_NAMESPACE)
    remove_placement_group(group.placement)
