"""Hooks into a running registration.

Pass callbacks explicitly: ``register(..., callbacks=[History(), EarlyStopping(patience=20)])``.
A callback implements any of ``on_level_start``, ``on_step``, ``on_level_end`` and ``on_end``;
each receives a frozen :class:`StepState` and may return :class:`Stop` (the class or an
instance) to end the current level early; the level then records the stop reason
``"callback"`` and the registration moves on to the next level (``Stop(all_levels=True)`` ends
the whole registration). Callbacks never change the optimisation otherwise.

Built-ins: :class:`Progress` (a rich progress bar on stderr; the default unless
``progress=False``), :class:`History` (records every state) and :class:`EarlyStopping`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepState:
    """The state of a registration at one iteration.

    Attributes:
        stage: stage index (0-based).
        transform: the stage's transform name.
        level: level index within the stage (0 = coarsest).
        levels: number of levels of the stage.
        iteration: iteration within the level (0-based; the number of iterations done at
            ``on_level_end``).
        max_iterations: the level's iteration budget.
        loss: the objective (metric loss plus weighted regularisers); lower is better.
        metric: the metric's quantity (for example MI in nats), see `quantity_name`.
        quantity_name: name of `metric`.
        learning_rate: current step size in mm (None for Powell).
        overlap: fraction of sampled fixed points that map inside the moving image and masks.
        elapsed_s: seconds since the registration started.
        stop_reason: why the level stopped (``on_level_end`` and ``on_end`` only).
    """

    stage: int
    transform: str
    level: int
    levels: int
    iteration: int
    max_iterations: int
    loss: float
    metric: float
    quantity_name: str
    learning_rate: float | None
    overlap: float
    elapsed_s: float
    stop_reason: str | None = None

    def as_dict(self) -> dict:
        """A JSON-serialisable dict of the state."""
        return asdict(self)


class Stop:
    """Returned by a callback to stop the current level (or, with `all_levels`, everything).

    Returning the class itself is the same as returning ``Stop()``.

    Args:
        reason: a note recorded in the log.
        all_levels: end the whole registration, not only the current level.
    """

    def __init__(self, reason: str = "", all_levels: bool = False) -> None:
        self.reason = reason
        self.all_levels = all_levels

    def __repr__(self) -> str:
        return f"Stop(reason={self.reason!r}, all_levels={self.all_levels})"


class Callback:
    """Convenience base class with no-op hooks; override the ones you need."""

    def on_level_start(self, state: StepState) -> Stop | type[Stop] | None:
        return None

    def on_step(self, state: StepState) -> Stop | type[Stop] | None:
        return None

    def on_level_end(self, state: StepState) -> Stop | type[Stop] | None:
        return None

    def on_end(self, state: StepState) -> None:
        return None


def _as_stop(value) -> Stop | None:
    if value is Stop:
        return Stop()
    if isinstance(value, Stop):
        return value
    return None


class CallbackList:
    """Dispatches hooks to several callbacks; any `Stop` wins.

    Args:
        callbacks: objects with any of the hook methods.
    """

    def __init__(self, callbacks: Iterable[object] = ()) -> None:
        self.callbacks = list(callbacks)

    def _call(self, hook: str, state: StepState) -> Stop | None:
        stop = None
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is None:
                continue
            got = _as_stop(fn(state))
            if got is not None:
                logger.info("callback %s asked to stop at %s: %s", type(cb).__name__, hook,
                            got.reason or "no reason given")
                stop = got if stop is None or got.all_levels else stop
        return stop

    def on_level_start(self, state: StepState) -> Stop | None:
        return self._call("on_level_start", state)

    def on_step(self, state: StepState) -> Stop | None:
        return self._call("on_step", state)

    def on_level_end(self, state: StepState) -> Stop | None:
        return self._call("on_level_end", state)

    def on_end(self, state: StepState) -> None:
        self._call("on_end", state)

    def close(self) -> None:
        """Release resources of callbacks that hold any (``close()``), e.g. a progress bar left
        open by an error."""
        for cb in self.callbacks:
            fn = getattr(cb, "close", None)
            if callable(fn):
                fn()


class History(Callback):
    """Records every state it sees.

    Attributes:
        steps: the states of every iteration, in order.
        levels: the states at the end of each level.
    """

    def __init__(self) -> None:
        self.steps: list[StepState] = []
        self.levels: list[StepState] = []

    def on_step(self, state: StepState) -> None:
        self.steps.append(state)

    def on_level_end(self, state: StepState) -> None:
        self.levels.append(state)

    def losses(self, stage: int | None = None, level: int | None = None) -> list[float]:
        """The loss of every recorded iteration, optionally of one stage / level."""
        return [s.loss for s in self.steps
                if (stage is None or s.stage == stage) and (level is None or s.level == level)]


class EarlyStopping(Callback):
    """Stops a level when the loss has not improved by `min_delta` for `patience` steps.

    Args:
        patience: iterations without improvement before stopping.
        min_delta: the improvement that counts (in loss units).
    """

    def __init__(self, patience: int = 20, min_delta: float = 0.0) -> None:
        if patience < 1:
            from itreg.errors import ConfigError

            raise ConfigError(f"EarlyStopping patience must be >= 1, got {patience}")
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self._best = float("inf")
        self._since = 0

    def on_level_start(self, state: StepState) -> None:
        self._best = float("inf")
        self._since = 0

    def on_step(self, state: StepState) -> Stop | None:
        if state.loss < self._best - self.min_delta:
            self._best = state.loss
            self._since = 0
            return None
        self._since += 1
        if self._since >= self.patience:
            return Stop(f"no improvement for {self.patience} iterations")
        return None


class Progress(Callback):
    """Progress on stderr: a live rich bar per stage and level on a terminal; off a terminal
    (a log file, a batch job) one plain timestamped line per level instead, never cut.

    Args:
        console: a ``rich.console.Console`` to draw on (default: stderr).
        transient: remove the bars when the registration ends.
    """

    def __init__(self, console=None, transient: bool = False) -> None:
        self.console = console
        self.transient = transient
        self._progress = None
        self._task = None
        self._lines: bool | None = None

    def _line_mode(self) -> bool:
        if self._lines is None:
            from rich.console import Console

            console = self.console or Console(stderr=True)
            self._lines = not console.is_terminal
        return self._lines

    def _ensure(self):
        if self._progress is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                console=self.console or Console(stderr=True), transient=self.transient,
            )
            self._progress.start()
        return self._progress

    @staticmethod
    def _describe(state: StepState) -> str:
        return f"stage {state.stage + 1} {state.transform} level {state.level + 1}/{state.levels}"

    def on_level_start(self, state: StepState) -> None:
        if self._line_mode():
            return
        progress = self._ensure()
        self._task = progress.add_task(self._describe(state),
                                       total=max(state.max_iterations, 1), info="")

    def on_step(self, state: StepState) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task, completed=state.iteration + 1,
                info=f"loss {state.loss:.5g} {state.quantity_name} {state.metric:.5g}")

    def on_level_end(self, state: StepState) -> None:
        if self._line_mode():
            import sys
            import time

            file = self.console.file if self.console is not None else sys.stderr
            file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self._describe(state)}: "
                       f"{state.iteration}/{state.max_iterations} iterations, loss "
                       f"{state.loss:.5g}, {state.quantity_name} {state.metric:.5g} "
                       f"({state.stop_reason}), {state.elapsed_s:.1f} s\n")
            file.flush()
            return
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task, completed=max(state.max_iterations, 1),
                info=f"loss {state.loss:.5g} {state.quantity_name} {state.metric:.5g} "
                     f"({state.stop_reason})")

    def on_end(self, state: StepState) -> None:
        self.close()

    def close(self) -> None:
        """Stop drawing (idempotent)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None
