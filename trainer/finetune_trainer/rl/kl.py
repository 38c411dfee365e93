"""KL penalty coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences")."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class KLController:
    """beta for the per-token -beta * KL reward. Fixed unless a target KL is set.

    Adaptive update, once per rollout of `episodes` sequences with measured mean sequence KL `kl`:
        error = clip(kl / target - 1, -0.2, 0.2);  beta *= 1 + error * episodes / horizon
    so beta grows when the policy drifts further than the target and shrinks when it stays closer.
    """

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, episodes: int) -> None:
        if self.target is None:
            return
        proportional_error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * episodes / self.horizon

    def state_dict(self) -> dict[str, float | int | None]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        self.value = float(state["value"])  # type: ignore[arg-type]


@dataclass
class RunningMoments:
    """Running mean/std of scores (parallel-variance merge of batch statistics), for `normalizeReward`."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-24

    def update(self, batch_mean: float, batch_var: float, batch_count: int) -> None:
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean += delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 1e-8) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])
