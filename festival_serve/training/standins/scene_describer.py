"""SmolVLM-shaped model directories with random weights, built offline.

The directory has the same layout and classes as ``HuggingFaceTB/SmolVLM-256M-Instruct``
(``Idefics3ForConditionalGeneration`` + ``Idefics3Processor`` + ``Idefics3ImageProcessor`` + a
byte-level BPE tokenizer with SmolVLM's special tokens and chat template), so it loads through
``festival_serve.models.scene_describer.describer.SceneDescriber`` exactly as the real model does. Two sizes:

    SMOLVLM_256M (benchmarks): SmolVLM-256M-Instruct's published configuration — SigLIP vision encoder
        (768 wide, 12 layers, 512 px tiles, patch 16, pixel shuffle 4 → 64 image tokens a tile) and a
        Llama text model (576 wide, 30 layers, 9 heads, 3 KV heads, 49,280-token vocabulary).
    TINY (tests): vision 64 px / patch 8 / scale 2 → 16 image tokens a tile, a 2-layer 64-wide text model.

Both keep the tile/resize ratio (``size.longest_edge`` = 4 × ``max_image_size.longest_edge``), so an
848×480 frame splits into 12 tiles + 1 global image when splitting is on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VlmSize:
    name: str
    vision_image_size: int
    patch_size: int
    scale_factor: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int | None  # None: the trained tokenizer's own (a few hundred tokens)
    rope_theta: float = 10000.0

    @property
    def image_seq_len(self) -> int:
        """``<image>`` tokens per tile: patches per side squared, shrunk by the pixel shuffle."""
        return (self.vision_image_size // self.patch_size) ** 2 // self.scale_factor**2


TINY = VlmSize("tiny", 64, 8, 2, 32, 64, 2, 2, 64, 128, 2, 4, 2, vocab_size=None)
SMOLVLM_256M = VlmSize("SmolVLM-256M", 512, 16, 4, 768, 3072, 12, 12, 576, 1536, 30, 9, 3,
                       vocab_size=49280, rope_theta=100000.0)

VISION_IMAGE_SIZE = TINY.vision_image_size
IMAGE_SEQ_LEN = TINY.image_seq_len  # 16 <image> tokens per tile in the tiny model

# SmolVLM's chat template (chat_template.json of SmolVLM-256M-Instruct): "<|im_start|>User:<image>text
# <end_of_utterance>\nAssistant:". Text-first messages get "User: " with a space, image-first "User:".
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# First three ids as in SmolLM2: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
]

_CORPUS = """\
User: Describe the road ahead for the driver in one or two sentences.
Assistant: A pedestrian is crossing at the zebra crossing ahead, so slow down and be ready to stop.
The speed limit sign reads 50, and a vehicle is parked on the right side of the road.
A stop sign is visible at the junction; traffic cones narrow the lane on the left.
There is a bump in the road ahead and a fence along the pavement.
Detected traffic signs: stop, speed limit, no entry, give way, pedestrian crossing, school zone.
Detected hazards: vehicle, creature, column, wall, weed, dent, traffic cone, traffic sign.
No traffic signs were detected. No hazards were detected in the frame.
The road is clear and dry; keep a safe distance from the car in front.
Watch for cyclists and children near the festival entrance and reduce your speed.
Heavy crowds are walking beside the road at night; use dipped headlights and drive carefully.
Road works ahead: follow the detour signs and merge into the right lane.
"""


def build_tokenizer(vocab_size: int | None = None, corpus: Iterable[str] | None = None, bpe_size: int = 512):
    """A byte-level BPE (like SmolLM2's GPT-2 style tokenizer) of ``bpe_size`` tokens trained in-process on
    ``corpus`` (lines; default: a few driving sentences): no download.

    ``vocab_size`` pads the vocabulary with filler tokens (``x<id>``) up to that size, so a random
    model's generated ids all decode, as with the real 49k-token vocabulary."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.splitlines() if corpus is None else corpus, trainer=trainer)
    if vocab_size is not None:
        spec = json.loads(backend.to_str())
        vocab = spec["model"]["vocab"]
        for token_id in range(len(vocab), vocab_size):
            vocab[f"x{token_id}"] = token_id
        backend = Tokenizer.from_str(json.dumps(spec))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=8192,
    )
    return tokenizer


def _build_config(tokenizer, size: VlmSize):
    from transformers import Idefics3Config, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    vision = Idefics3VisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.vision_image_size,
        patch_size=size.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        max_position_embeddings=8192,
        rope_theta=size.rope_theta,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        scale_factor=size.scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )


def build_idefics3(directory: Path, size: VlmSize = TINY, *, seed: int = 0, fixed_new_tokens: bool = False,
                   dtype: str = "float32", tokenizer=None) -> Path:
    """Write a random Idefics3 model of ``size``, its processor and tokenizer (default: ``build_tokenizer``'s)
    to ``directory``; return it.

    ``fixed_new_tokens`` never lets generation stop early (a random model may emit end-of-utterance at
    any step): every description then costs exactly ``max_new_tokens``, as a benchmark needs."""
    import torch
    from transformers import Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or build_tokenizer(size.vocab_size)
    config = _build_config(tokenizer, size)

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config).eval()
    end_of_utterance = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    # SmolVLM-Instruct stops at <end_of_utterance>; the stand-in keeps that rule.
    model.generation_config.eos_token_id = [end_of_utterance, tokenizer.eos_token_id]
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if fixed_new_tokens:
        model.generation_config.suppress_tokens = [end_of_utterance, tokenizer.eos_token_id]
    model.to(getattr(torch, dtype)).save_pretrained(directory)

    image_processor = Idefics3ImageProcessor(
        do_image_splitting=True,
        max_image_size={"longest_edge": size.vision_image_size},
        size={"longest_edge": 4 * size.vision_image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=size.image_seq_len,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(directory)
    return directory


def build_tiny_idefics3(directory: Path, *, seed: int = 0) -> Path:
    """The tests' tiny model (see ``TINY``)."""
    return build_idefics3(directory, TINY, seed=seed)
