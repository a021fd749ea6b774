"""Small CLIP text encoders for tiny and nano models, with the real CLIP tokenizer rebuilt offline from the
`openai-clip` package's BPE merges file (no download)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import torch

CLIP_VOCAB = 49408


def _bpe_file() -> Path:
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("building a CLIP tokenizer offline needs the openai-clip package "
                                "(pip install --no-deps openai-clip) for its BPE merges file")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def _printable_bytes() -> list[str]:
    """GPT-2/CLIP byte -> unicode table, in the vocabulary's order (printable bytes first, the rest shifted)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    shifted = {b: chr(256 + n) for n, b in enumerate(rest)}
    return [chr(b) for b in printable] + [shifted[b] for b in rest]


def clip_tokenizer(max_length: int = 77):
    """The CLIP ViT / bigG tokenizer: 49,408 ids, BOS 49406, EOS 49407, pad "!" (id 0), as Stable Cascade uses."""
    from transformers import CLIPTokenizer

    lines = gzip.open(_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    chars = _printable_bytes()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, pad_token="!",
                         model_max_length=max_length)


def small_text_model(hidden: int = 32, projection: int = 32, layers: int = 2, heads: int = 4, seed: int = 0):
    """A CLIPTextModelWithProjection of the released kind (vocab 49408, 77 positions, EOS pooling), seeded."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                         projection_dim=projection, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(cfg).eval()


def encode_text(model, tokenizer, prompts, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (B,77,h) before the final LayerNorm, pooled (B,1,p)), as `conditioning.TextEncoder`, with autograd
    left to the caller (LoRA token training needs gradients)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    out = model(ids.input_ids.to(device), attention_mask=ids.attention_mask.to(device), output_hidden_states=True)
    return out.hidden_states[-1], out.text_embeds.unsqueeze(1)
