"""A synthetic vision-language world for the demo and tests: rendered shapes with captions and questions.

Each scene is one shape (circle, square or triangle) of one of six colours, small or large, at one of four
positions, with a little jitter. Captions read like ``"a small red circle on the left"``; questions ask for
one attribute (``"what color is the shape ?"`` -> ``"red"``). The same vocabulary drives a text-only corpus
used to pretrain the tiny target LLM, so the LLM knows the words before it ever sees an image.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
    "yellow": (230, 210, 40), "purple": (150, 60, 190), "orange": (240, 140, 30),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom")
QUESTIONS = {
    "color": "what color is the shape ?",
    "shape": "what shape is it ?",
    "size": "how big is the shape ?",
    "position": "where is the shape ?",
}


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on the {self.position}"

    def answer(self, attribute: str) -> str:
        return getattr(self, attribute)


def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), rng.choice(POSITIONS))


def render(scene: Scene, size: int = 32, rng: random.Random | None = None) -> Image.Image:
    """The scene as an RGB image on a light grey background (jittered position and size)."""
    rng = rng or random.Random(0)
    img = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    r = size * (0.2 if scene.size == "small" else 0.32) * rng.uniform(0.9, 1.1)
    c = size / 2
    off = size * 0.25
    cx, cy = {"left": (c - off, c), "right": (c + off, c), "top": (c, c - off), "bottom": (c, c + off)}[scene.position]
    cx += rng.uniform(-1.5, 1.5)
    cy += rng.uniform(-1.5, 1.5)
    color = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif scene.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img


def vocabulary_texts() -> list[str]:
    """Every word the world uses, for building the word-level tokenizer."""
    words = list(SHAPES) + list(COLORS) + list(SIZES) + list(POSITIONS)
    return [" ".join(words), "a on the .", *QUESTIONS.values(), "describe the image ."]


def text_corpus(num_lines: int, seed: int = 0) -> Iterator[str]:
    """Text-only pretraining corpus: captions, attribute Q/A and a copy pattern ``keywords . caption``.

    The copy pattern teaches the LM to turn a bag of attribute words into a caption in context — the skill an
    image encoder later exploits by producing embeddings the LM reads like those words.
    """
    rng = random.Random(seed)
    for _ in range(num_lines):
        s = random_scene(rng)
        kind = rng.random()
        if kind < 0.4:
            yield f"{s.size} {s.color} {s.shape} {s.position} . {s.caption} ."
        elif kind < 0.7:
            yield f"{s.caption} ."
        else:
            attr = rng.choice(list(QUESTIONS))
            yield f"{s.caption} . {QUESTIONS[attr]} {s.answer(attr)} ."


def vision_samples(num: int, seed: int = 0, image_size: int = 32) -> list[dict]:
    """Image + conversation samples: half captioning, half attribute questions (LLaVA-style records)."""
    rng = random.Random(seed)
    out = []
    for i in range(num):
        s = random_scene(rng)
        img = np.asarray(render(s, image_size, rng))
        if rng.random() < 0.5:
            prompt, answer = "<image> describe the image .", s.caption
        else:
            attr = rng.choice(list(QUESTIONS))
            prompt, answer = f"<image> {QUESTIONS[attr]}", s.answer(attr)
        out.append({"id": i, "image": img, "scene": s, "prompt": prompt, "answer": answer})
    return out
