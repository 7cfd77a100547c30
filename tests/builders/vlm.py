"""A tiny, randomly initialised SmolVLM-shaped model directory, built offline for tests.

The directory has the same layout and classes as ``HuggingFaceTB/SmolVLM-256M-Instruct``
(``Idefics3ForConditionalGeneration`` + ``Idefics3Processor`` + ``Idefics3ImageProcessor`` + a
byte-level BPE tokenizer with SmolVLM's special tokens and chat template), so it loads through
``festival_serve.vlm.SceneDescriber`` exactly as the real model does. Only the sizes shrink:

    real:  vision 512 px / patch 16 → 32×32 patches, scale_factor 4 → 64 image tokens per tile
    tiny:  vision  64 px / patch  8 →  8×8  patches, scale_factor 2 → 16 image tokens per tile

and the tile/resize ratio is kept (``size.longest_edge`` = 4 × ``max_image_size.longest_edge``), so an
848×480 frame still splits into 12 tiles + 1 global image when splitting is on.
"""

from __future__ import annotations

from pathlib import Path

VISION_IMAGE_SIZE = 64
PATCH_SIZE = 8
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (VISION_IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2  # 16 <image> tokens per tile

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


def _build_tokenizer():
    """A byte-level BPE (like SmolLM2's GPT-2 style tokenizer) trained in-process: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=2048,
    )
    return tokenizer


def _build_config(tokenizer):
    from transformers import Idefics3Config, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    vision = Idefics3VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=VISION_IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_idefics3(directory: Path, *, seed: int = 0) -> Path:
    """Write a random tiny Idefics3 model, its processor and tokenizer to ``directory``; return it."""
    import torch
    from transformers import Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    config = _build_config(tokenizer)

    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    end_of_utterance = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    # SmolVLM-Instruct stops at <end_of_utterance>; the tiny model keeps that rule.
    model.generation_config.eos_token_id = [end_of_utterance, tokenizer.eos_token_id]
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)

    image_processor = Idefics3ImageProcessor(
        do_image_splitting=True,
        max_image_size={"longest_edge": VISION_IMAGE_SIZE},
        size={"longest_edge": 4 * VISION_IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(directory)
    return directory
