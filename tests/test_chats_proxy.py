"""CHATS' proxy prompt is built on the ENCODED empty prompt, pooled embedding included, as
CHATS' own SD1.5 and SDXL pipelines do: for SDXL that is NOT its CFG null (zeros)."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from snpo.backbones import load_backbone
from snpo.methods.chats import chats_guide
from tiny_pipelines import make_sdxl

PROMPTS = ["a red cat", "a blue dog"]


class Recorder(torch.nn.Module):
    """Stands in for a denoiser: records the condition it is called with, returns zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, **_):
        self.calls.append({"encoder_hidden_states": encoder_hidden_states, **(added_cond_kwargs or {})})
        return type("Out", (), {"sample": torch.zeros_like(sample)})()


@torch.no_grad()
def test_sdxl_chats_proxy_is_built_on_the_encoded_empty_prompt(tmp_path):
    path = make_sdxl(tmp_path / "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    assert pipe.config.force_zeros_for_empty_prompt  # the CFG null is zeros here
    backbone = load_backbone(path)
    cond = backbone.encode_prompts(PROMPTS)
    null = backbone.null_condition(cond)
    assert bool((null["encoder_hidden_states"] == 0).all())
    win, lose = Recorder(), Recorder()
    latents = torch.randn(2, 4, 8, 8)
    chats_guide(backbone, win, lose, 4.0, proxy_alpha=0.5)(latents, torch.tensor([10, 10]), cond, null)
    # the pipeline's own encoding of "" with both encoders (its "negative" when not zeroed)
    empty, _, empty_pooled, _ = pipe.encode_prompt(["", ""], device="cpu", do_classifier_free_guidance=False)
    got = lose.calls[0]
    torch.testing.assert_close(got["encoder_hidden_states"], 1.5 * empty - 0.5 * cond["encoder_hidden_states"])
    torch.testing.assert_close(got["text_embeds"], 1.5 * empty_pooled - 0.5 * cond["text_embeds"])
    assert torch.equal(got["time_ids"], cond["time_ids"])  # micro-conditioning is the prompt's
    assert not torch.allclose(empty, torch.zeros_like(empty))  # so zeros would have differed
