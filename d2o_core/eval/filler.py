"""Filler text and word lists for the synthetic tasks (ruler.py): the haystack the needles hide in.

Licence: the paragraphs and word lists below were written for this project and are released under
CC0 1.0 (public domain dedication, https://creativecommons.org/publicdomain/zero/1.0/). They are plain
Python so that they ship inside the package (a pip-installed `d2o_core` has no assets/ folder); nothing
is downloaded, and nothing here comes from RULER's Paul Graham essays or any other corpus.

What it is not: a task; ruler.py and tasks.py build prompts from these.
"""

from __future__ import annotations

import re

PARAGRAPHS: tuple[str, ...] = (
    "The harbour town wakes before the sun. Fishing boats leave the quay in a slow line, their lamps "
    "swinging over the dark water. On the hill above the church, a baker opens the shutters and the smell "
    "of warm rye drifts down the lanes. By seven the market square is full of crates, voices and gulls. "
    "Nobody hurries, yet everything is ready by the time the first bus arrives from the valley.",
    "A good loaf needs four things: flour, water, salt and patience. The dough is mixed in the evening and "
    "left to rest in a cool room overnight. In the morning it is folded, shaped and set to rise again. "
    "The oven must be hotter than seems sensible. When the crust sings as it cools, the bread is done, "
    "and the kitchen is quiet for a moment while everyone waits to cut the first slice.",
    "The river changes its mind every spring. Where there was a gravel bank last year there is now a deep "
    "pool, and the old path along the water has slipped into the reeds. Herons stand in the shallows like "
    "grey posts. Children throw sticks from the stone bridge and race to the other side to see which one "
    "comes out first. In summer the water is warm enough to wade across at the ford.",
    "The library on the corner keeps its windows open in warm weather. Pages turn, chairs creak, and a "
    "clock above the desk ticks louder than it should. Old maps hang in the stairwell, showing roads that "
    "no longer exist and villages spelled in ways nobody remembers. The librarian knows where every book "
    "is, even the ones that were put back on the wrong shelf years ago.",
    "Weather on the coast arrives all at once. A clear morning turns to fog before lunch, and the fog lifts "
    "just as suddenly to reveal a sky scrubbed clean. Sailors read the clouds the way farmers read the "
    "soil. Washing lines are a gamble, and umbrellas are left by the door of every house, whether anyone "
    "expects rain or not.",
    "In the workshop behind the station, an old clockmaker repairs watches that stopped long ago. Tiny "
    "screws wait in labelled jars, and springs lie coiled on a square of green felt. He works with the "
    "radio on, though he rarely listens to it. When a watch starts ticking again he holds it to his ear "
    "for a long time before he writes the bill.",
    "The orchard is planted in rows that lean a little to the east, shaped by years of wind from the sea. "
    "In autumn the apples are picked by hand and stacked in wooden boxes that smell of cider. Wasps drift "
    "between the fallen fruit. The best trees are the oldest ones, gnarled and half hollow, which still "
    "give more apples than the young trees planted beside them.",
    "Trains on the branch line run twice an hour and are rarely late. The carriages are old but clean, "
    "and the conductor greets regular passengers by name. From the window you can see sheep on the hills, "
    "a ruined mill and a lake that turns silver in the evening light. Most people read or sleep, and a few "
    "simply watch the fields go by until the line ends at the sea.",
)

SENTENCES: tuple[str, ...] = tuple(
    s for p in PARAGRAPHS for s in re.split(r"(?<=[.!?])\s+", p) if s
)  # one filler unit each, in reading order

ADJECTIVES: tuple[str, ...] = (
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
    "lanky", "mellow", "nimble", "olive", "plucky", "quiet", "rusty", "sandy", "tidy", "upbeat", "vivid",
    "wiry", "young", "zesty", "bold", "crisp", "dapper", "frosty", "glossy", "hazy", "lucky",
)  # fmt: skip
NOUNS: tuple[str, ...] = (
    "anchor", "badger", "candle", "dolphin", "ember", "falcon", "garden", "harbour", "island", "jacket",
    "kettle", "lantern", "meadow", "needle", "otter", "pebble", "quarry", "raven", "saddle", "thimble",
    "umbrella", "violin", "walnut", "yarrow", "zephyr", "basket", "compass", "drum", "feather", "glacier",
    "hammock", "ladder",
)  # fmt: skip
