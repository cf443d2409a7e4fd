"""Scalar heads on a causal-LM backbone: PPO's critic (a value per token) and the reward model
(one score per sequence, read at the last real token).

Both wrap the decoder of a causal LM (`model.get_decoder()`: embeddings + transformer blocks, no
lm_head) and add an fp32 `nn.Linear(H, 1)`. A saved model is a directory holding the backbone in HF
format (`save_pretrained`, safetensors), the head as `head.safetensors` and, when given, the
tokenizer, so it loads back by path alone.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Self

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel

from models.forward import CausalLM, completion_hidden, sequence_hidden

if TYPE_CHECKING:
    from models.lora import AdapterView

HEAD_FILE = "head.safetensors"
META_FILE = "head_config.json"


class ScalarHeadModel(nn.Module):
    """backbone (a decoder returning last_hidden_state [B, T, H]) + fp32 linear head H -> 1."""

    kind = "scalar"

    def __init__(self, backbone: PreTrainedModel | AdapterView, init_std: float = 0.0):
        super().__init__()
        self.backbone = backbone
        hidden_size = backbone.config.hidden_size
        self.head = nn.Linear(hidden_size, 1, dtype=torch.float32, device=backbone.device)
        # the bias starts at 0 either way: an untrained head predicts 0 rather than an arbitrary offset
        nn.init.zeros_(self.head.bias)
        if init_std > 0:
            nn.init.normal_(self.head.weight, std=init_std)
        else:
            nn.init.zeros_(self.head.weight)

    @classmethod
    def from_causal_lm(cls, model: CausalLM, copy_weights: bool = True) -> Self:
        """A head on the decoder of `model`; copy_weights=False shares (and then trains) its weights."""
        decoder = model.get_decoder()
        return cls(copy.deepcopy(decoder) if copy_weights else decoder)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Last hidden states [B, T, H] (backbone dtype); positions count real tokens only (left padding)."""
        return sequence_hidden(self.backbone, input_ids, attention_mask)  # packed inside forward.packed_passes

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The head at every position: [B, T] fp32."""
        return self.head(self.hidden(input_ids, attention_mask).float()).squeeze(-1)

    def save(self, directory: str | Path, tokenizer=None, state_dict: dict[str, Tensor] | None = None) -> Path:
        """state_dict: this model's full weights, when its own are sharded (parallel.fsdp)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            self.backbone.save_pretrained(directory, safe_serialization=True)
            head = self.head.state_dict()
        else:
            backbone = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
            self.backbone.save_pretrained(directory, safe_serialization=True, state_dict=backbone)
            head = {k.removeprefix("head."): v for k, v in state_dict.items() if k.startswith("head.")}
        save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, directory / HEAD_FILE)
        (directory / META_FILE).write_text(json.dumps({"kind": self.kind}))
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Self:
        """A model written by `save`; raises FileNotFoundError when `directory` holds none."""
        directory = Path(directory)
        if not (directory / HEAD_FILE).exists() or not (directory / "config.json").exists():
            raise FileNotFoundError(f"{directory} holds no saved {cls.kind} model ({HEAD_FILE} + config.json)")
        kind = json.loads((directory / META_FILE).read_text()).get("kind") if (directory / META_FILE).exists() else None
        if kind not in (None, cls.kind):
            raise ValueError(f"{directory} holds a {kind} model, not a {cls.kind} model")
        backbone = AutoModel.from_pretrained(directory, dtype=dtype) if dtype else AutoModel.from_pretrained(directory)
        model = cls(backbone.to(device))
        model.head.load_state_dict(load_file(directory / HEAD_FILE, device=str(device)))
        return model.eval()

    def load_weights(self, directory: str | Path) -> None:
        """Overwrite this model's backbone and head, in place, with those `save` wrote to `directory`."""
        from models.loading import load_weights_into

        load_weights_into(self.backbone, directory, skip=(HEAD_FILE,))
        with torch.no_grad():
            for key, value in load_file(Path(directory) / HEAD_FILE).items():
                self.head.state_dict(keep_vars=True)[key].copy_(value)

    @staticmethod
    def read_weights(directory: str | Path) -> dict[str, Tensor]:
        """What `save` wrote to `directory`, keyed as this model's state_dict."""
        from models.loading import read_weights

        state = {f"backbone.{k}": v for k, v in read_weights(directory, skip=(HEAD_FILE,)).items()}
        state.update({f"head.{k}": v for k, v in load_file(Path(directory) / HEAD_FILE).items()})
        return state


class ValueModel(ScalarHeadModel):
    """PPO's critic: a value per completion token.

    Convention (TRL, OpenRLHF): the value of completion token t is read from the hidden state of the
    position whose next token is token t -- V of the state (prompt, tokens < t) in which token t is
    chosen. It is the same slice as `models.logprobs.completion_logprobs`, so values[:, t],
    logp[:, t] and the per-token reward r_t all refer to one action.
    """

    kind = "value"

    def values(self, input_ids: Tensor, attention_mask: Tensor, completion_len: int) -> Tensor:
        """input_ids, attention_mask: [B, Tp + Tc] (prompt left-padded, then completion) -> values [B, Tc] fp32."""
        hidden = completion_hidden(self.backbone, input_ids, attention_mask, completion_len)  # [B, Tc, H]
        return self.head(hidden.float()).squeeze(-1)


class RewardModel(ScalarHeadModel):
    """A sequence reward: the head read at the last real token of prompt + response."""

    kind = "reward"

    def __init__(self, backbone: PreTrainedModel, init_std: float | None = None):
        # a small random head (as TRL's reward modelling does) so pairs differ from the first step
        std = 1.0 / (backbone.config.hidden_size + 1) ** 0.5 if init_std is None else init_std
        super().__init__(backbone, init_std=std)

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: [B, T] with any padding -> scores [B] fp32."""
        hidden = self.hidden(input_ids, attention_mask)  # [B, T, H]
        T = attention_mask.shape[1]
        last = T - 1 - attention_mask.long().flip(-1).argmax(-1)  # index of the last real token, [B]
        last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
        return self.head(last_hidden.float()).squeeze(-1)


def encode_texts(tokenizer, prompts: list[str], responses: list[str], device: torch.device | str) -> dict[str, Tensor]:
    """prompt + response texts as one left-padded batch (no special tokens added: the chat template
    already wrote them into the prompt), the form `RewardModel.score` reads."""
    texts = [p + r for p, r in zip(prompts, responses)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
