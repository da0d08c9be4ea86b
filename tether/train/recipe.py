"""What a training recipe is.

A recipe builds its models and optimisers through the `Trainer` (which
shards, casts and checkpoints them the same way at every scale) and defines
one optimisation step. Everything a recipe needs per step comes from the
step number and the rank, so a resumed run draws exactly the batches an
uninterrupted one would have.

    class MyRecipe(Recipe):
        name = "my-recipe"

        def setup(self):
            self.model = self.trainer.add_model("model", build_model(self.cfg))
            self.opt = self.trainer.add_optimizer("opt", self.model, lr=self.cfg["lr"])

        def step(self, step: int) -> dict:
            for micro in range(self.trainer.accumulation):
                batch = self.batch(step, micro)
                loss = ...
                self.trainer.backward(loss, self.model, micro)
            self.trainer.optimizer_step("opt", self.model)
            return {"loss": loss.item()}

`export(folder)` writes what `tether generate` (or the next recipe) loads.
"""


class Recipe:
    name = "base"

    def __init__(self, cfg: dict, trainer):
        self.cfg = cfg
        self.trainer = trainer

    def setup(self) -> None:
        raise NotImplementedError

    def step(self, step: int) -> dict:
        raise NotImplementedError

    def export(self, folder) -> None:
        """Write the trained result in its inference format (default: nothing to export)."""


RECIPES = {}


def register_recipe(cls):
    RECIPES[cls.name] = cls
    return cls
