"""Word contrast: a teacher loss that makes the flow depend on each attribute word.

A subject covers a few % of a toy frame, so its shape word changes the flow
of a few latent pixels, by a little (a circle and a square of the same
colour differ in their corners). Plain flow matching, even weighted towards
the subjects, leaves that word unused: after 5,500 steps `tether bench
binding` finds the built-in teacher near chance on shape (32 %, chance 20 %),
while it binds the background (100 %) and, partly, the colour (78 %).

This turns the ranking `bench binding` measures into a loss. For a clip,
its prompt and a variant with one of the subject's attribute words swapped
("a red circle" -> "a red square") predict the flow from the same noisy
latents; on the subjects' latent pixels the true prompt's squared error must
undercut the variant's by a relative margin:

    loss = relu((1 + margin) * e_true - e_variant) / e_true,

the denominator held constant, so the loss is in units of the true error
and the same margin fits every timestep. It is zero once the prompt's word
is used by that margin, and never rewards pushing the variant's flow further
away than that. Only timesteps from `min_timestep` up take part: at low
noise the latents show the subject, and the word has nothing to add.

Leak variants (`leak`: a probability). In a two-subject scene the models
paint both subjects the colour of one of them ("a red square and a blue
circle" comes out as two red blobs): of the frames where the built-in
student shows both subjects of a two-colour prompt, 27 % show two colours
(`bench adherence`'s "two colours"). A random swap rarely names that failure.
A leak variant does: one subject takes the other's stated value ("... and a
red circle"), so the true prompt must beat the prompt that describes the
leaked picture. Measured on the built-in teacher, it does not help: 400 steps
left fewer frames in two colours (docs/built_in_model_log.md), so the chain
does not use it.
"""

import torch

from ..world.prompts import one_word_variants

SUBJECT_ATTRIBUTES = ("shape", "colour", "pattern", "size")


def swapped_prompt(prompt: str, attributes, generator: torch.Generator, leak: float = 0.0) -> str | None:
    """`prompt` with one stated subject attribute (from `attributes`) set to another value; None if none is stated.

    With probability `leak`, where two subjects state different values of an attribute, the other
    value is the other subject's (a leak variant; see the module docstring).
    """
    stated = {key: entry for key, entry in one_word_variants(prompt).items()
              if key[1] is not None and key[0] in attributes}
    leaks = [(variants, stated[(name, 1 - index)][0]) for (name, index), (truth, variants) in stated.items()
             if (name, 1 - index) in stated and stated[(name, 1 - index)][0] != truth]
    if leaks and leak > 0 and torch.rand(1, generator=generator).item() < leak:  # leak 0 keeps the old random stream
        variants, other_value = leaks[torch.randint(len(leaks), (1,), generator=generator).item()]
        return variants[other_value]
    choices = list(stated.values())
    if not choices:
        return None
    truth, variants = choices[torch.randint(len(choices), (1,), generator=generator).item()]
    other = torch.randint(len(variants) - 1, (1,), generator=generator).item()
    return variants[other + (other >= truth)]


def word_contrast_loss(true_error: torch.Tensor, variant_error: torch.Tensor, mask: torch.Tensor,
                       margin: float) -> torch.Tensor:
    """Mean hinge over the clips whose mask is not empty.

    `true_error`, `variant_error`: squared flow errors [N, C, F, h, w] of the same
    noisy latents under the true prompt and under its variant; `mask`
    [N, 1, F, h, w]: the subjects' latent pixels.
    """
    dims = tuple(range(1, true_error.dim()))
    area = mask.expand_as(true_error).sum(dim=dims)
    e_true = (true_error * mask).sum(dim=dims) / area.clamp(min=1)
    e_variant = (variant_error * mask).sum(dim=dims) / area.clamp(min=1)
    hinge = torch.relu((1 + margin) * e_true - e_variant) / e_true.detach().clamp(min=1e-8)
    seen = area > 0
    return hinge[seen].mean() if seen.any() else true_error.sum() * 0
