"""Dataset loading, prompt rendering and prompt sampling; the shipped sample lives beside this file."""

from data.loading import (
    PromptSampler,
    attach_prompts,
    load_examples,
    normalise_row,
    render_prompt,
    resolve_source,
)

__all__ = ["PromptSampler", "attach_prompts", "load_examples", "normalise_row", "render_prompt", "resolve_source"]
