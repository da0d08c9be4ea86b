"""`ode-init`: regression of the causal student onto teacher ODE trajectories [CausVid, SF].

DMD starts from a generator that already produces something video-like in
few steps; this recipe makes one. The bidirectional teacher integrates the
flow ODE from noise (Euler, `ode.steps` steps on the grid shifted by
`ode.shift`, by default the recipe's `shift`, with classifier-free
guidance); the states it passes at the student's denoising timesteps
(warped [1000, 750, 500, 250]) are recorded. The causal student
(block-causal forward, one timestep per frame) sees, chunk by chunk, one of
those states (its step drawn per sample and per chunk) and learns to map it
to the trajectory's end x0 (mean squared error on x0).

Trajectories are a pure function of (seed, step, micro-batch): they are
computed on the fly from the shared generator, so no dataset is needed and
a resumed run sees the same ones. Cost: `ode.steps` + the student steps
bidirectional teacher forwards per clip, twice with guidance (toy scale:
~100 forwards of 21x8x8 latents per step). `ode.pool: N` reuses N batches of
trajectories (computed once each, kept in memory) instead of drawing a fresh
one every step, and `ode.cache_dir` also keeps them on disk, per rank, for
resumed or repeated runs; a cache belongs to one teacher and seed.
"""

from pathlib import Path

import torch

from ...schedule import timestep_grid, warp_steps
from ..data import make_data
from ..dmd import load_score, score_sources
from ..recipe import register_recipe
from .distill_base import DistillationRecipe, GlobalDraws, clip_shape, draw_prompts


def ode_timesteps(num_steps: int, shift: float, required) -> list:
    """A descending Euler grid: the shifted `num_steps`-step grid plus the timesteps we must stop at, ending at 0."""
    grid = {round(float(t), 6) for t in timestep_grid(shift, num_steps)}
    grid.update(round(float(t), 6) for t in required)
    return sorted(grid, reverse=True)


@torch.no_grad()
def teacher_trajectory(teacher, noise, text, grid: list, keep: list, guidance: float):
    """Euler-integrate the guided flow from `noise` along `grid`; returns (states at `keep`, final x0).

    Guidance is the textbook uncond + w (cond - uncond), as a sampler applies it.
    """
    x = noise.float()
    states = {}
    keep_keys = {round(float(t), 6) for t in keep}
    uncond = torch.zeros_like(text)
    both_texts = torch.cat([text, uncond])
    for t, t_next in zip(grid[:-1], grid[1:]):
        if t in keep_keys:
            states[t] = x.clone()
        if guidance == 1:
            flow = teacher.forward_bidirectional(x, torch.full((x.shape[0],), t, device=x.device), text).float()
        else:  # cond and uncond in one forward
            both = teacher.forward_bidirectional(torch.cat([x, x]), torch.full((2 * x.shape[0],), t, device=x.device),
                                                 both_texts).float()
            cond, free = both.chunk(2)
            flow = free + guidance * (cond - free)
        x = x + (t_next - t) / 1000.0 * flow  # dx/dsigma = v
    return torch.stack([states[round(float(t), 6)] for t in keep]), x


@register_recipe
class OdeInit(DistillationRecipe):
    name = "ode-init"

    def setup(self):
        cfg = self.cfg
        self.setup_generator()
        teacher_source, _ = score_sources(cfg)
        self.teacher = self.trainer.add_model("teacher", load_score(teacher_source, self.model_cfg, "teacher"),
                                              trainable=False)
        self.data = make_data(cfg.get("data", {}), self.model_cfg)
        ode = cfg.get("ode", {})
        self.student_timesteps = warp_steps(self.denoising_steps, self.shift)
        # The teacher's own Euler grid may be shifted harder than the student's timesteps: with few steps at
        # high noise a small teacher never commits to a small subject (measured with `bench adherence
        # --teacher-shift`), and the student can only learn what the trajectories show.
        ode_shift = float(ode.get("shift") or self.shift)
        self.grid = ode_timesteps(int(ode.get("steps", 48)), ode_shift, self.student_timesteps)
        self.guidance = float(ode.get("guidance", 5.0))
        self.pool = ode.get("pool")
        self.cache_dir = Path(ode["cache_dir"]) if ode.get("cache_dir") else None
        self._memory = {}

    # ---- trajectories ------------------------------------------------------
    def trajectories(self, step: int, micro: int):
        """(states [S, B, C, F, h, w], x0, text) of this rank's share of the batch."""
        trainer = self.trainer
        key = (step % int(self.pool) if self.pool else step, micro)
        if key in self._memory:
            return self._memory[key]
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"trajectory-{key[0]}-{key[1]}-rank{trainer.rank}of{trainer.world_size}.pt"
            if path.is_file():
                found = torch.load(path, map_location="cpu", weights_only=True)
                return self._remember(key, tuple(t.to(trainer.device) for t in found))
        draws = GlobalDraws(trainer, key[0], "ode-trajectory", key[1])
        text = draw_prompts(self.data, draws.generator, self.global_batch)
        noise = draws.noise((self.batch_size, *clip_shape(self.data)))
        text = draws.share(text)
        with trainer.autocast():
            states, x0 = teacher_trajectory(self.teacher, noise.to(trainer.device), text, self.grid,
                                            self.student_timesteps, self.guidance)
        result = (states.float(), x0.float(), text)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(tuple(t.cpu() for t in result), tmp)
            tmp.replace(path)
        return self._remember(key, result)

    def _remember(self, key, result):
        if self.pool:  # without a pool a key never comes back: keeping it would only grow memory
            self._memory[key] = result
        return result

    # ---- a step ----------------------------------------------------------------
    def regression_loss(self, states, x0, text, generator):
        """MSE between the student's x0 and the trajectory's end, each chunk at its own recorded state."""
        num_steps, batch, _, frames = states.shape[:4]
        chunks = -(-frames // self.chunk_frames)
        index = self.trainer.my_share(torch.randint(num_steps, (self.global_batch, chunks), generator=generator))
        per_frame = index.repeat_interleave(self.chunk_frames, dim=1)[:, :frames].to(states.device)
        noisy = self._pick(states, per_frame)
        timesteps = torch.tensor(self.student_timesteps, device=states.device)[per_frame]
        flow = self.generator.forward_block_causal(noisy, timesteps, text, chunk_size=self.chunk_frames)
        sigma = (timesteps / 1000.0)[:, None, :, None, None]
        prediction = noisy.float() - sigma * flow.float()
        return torch.mean((prediction - x0.float()) ** 2)

    @staticmethod
    def _pick(states, per_frame):
        """noisy[b, :, f] = states[per_frame[b, f], b, :, f]."""
        batch, frames = per_frame.shape
        rows = torch.arange(batch, device=states.device)[:, None].expand(batch, frames)
        cols = torch.arange(frames, device=states.device)[None, :].expand(batch, frames)
        picked = states.permute(0, 1, 3, 2, 4, 5)[per_frame, rows, cols]  # [B, F, C, h, w]
        return picked.permute(0, 2, 1, 3, 4)

    def step(self, step: int) -> dict:
        trainer = self.trainer
        total = 0.0
        for micro in range(trainer.accumulation):
            states, x0, text = self.trajectories(step, micro)
            draws = GlobalDraws(trainer, step, "ode-steps", micro)
            with trainer.autocast():
                loss = self.regression_loss(states, x0, text, draws.generator)
            trainer.backward(loss, self.generator, micro)
            total += loss.item() / trainer.accumulation
        return {"loss": total, "grad_norm": trainer.optimizer_step("generator", step)}
