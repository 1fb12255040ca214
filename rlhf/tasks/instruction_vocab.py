"""The instruction task's word lists: categories the judge checks list items against, and capitals.

Common words a 135M instruct model knows; every list is lower case. Plural items are read back to these
forms by `singular` ("apples" -> "apple", "peaches" -> "peach", "mice" stays unknown).
"""

from __future__ import annotations

CATEGORIES: dict[str, frozenset[str]] = {
    "fruits": frozenset(
        "apple banana cherry orange grape pear peach plum mango lemon lime kiwi melon watermelon strawberry "
        "raspberry blueberry pineapple apricot coconut fig papaya pomegranate grapefruit blackberry "
        "nectarine tangerine date guava lychee".split()),
    "animals": frozenset(
        "dog cat horse cow pig sheep goat lion tiger bear wolf fox rabbit deer elephant giraffe zebra monkey "
        "mouse rat squirrel kangaroo koala panda camel donkey hippo rhino leopard cheetah otter beaver "
        "whale dolphin shark owl eagle duck chicken frog snake turtle fish bird bee ant spider butterfly parrot "
        "penguin".split()),
    "colors": frozenset(
        "red orange yellow green blue purple violet pink brown black white gray grey indigo cyan magenta "
        "turquoise beige maroon navy teal gold silver".split()),
    "vegetables": frozenset(
        "carrot potato tomato onion garlic cabbage lettuce spinach broccoli cauliflower cucumber pepper "
        "pea bean corn celery pumpkin zucchini eggplant radish beet turnip kale asparagus leek".split()),
    "countries": frozenset(
        "france germany italy spain portugal japan china india brazil canada mexico egypt kenya nigeria "
        "australia russia greece turkey sweden norway finland poland ireland argentina chile peru "
        "thailand vietnam indonesia austria switzerland belgium netherlands denmark".split()
        + ["united states", "united kingdom", "south africa", "south korea", "new zealand"]),
}

# one-word capitals only: the prompt asks for one word
CAPITALS: dict[str, str] = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Egypt": "Cairo", "Russia": "Moscow", "Greece": "Athens",
    "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki", "Poland": "Warsaw", "Ireland": "Dublin",
    "Austria": "Vienna", "Belgium": "Brussels", "Denmark": "Copenhagen", "Kenya": "Nairobi",
    "Peru": "Lima", "Chile": "Santiago", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Canada": "Ottawa", "Australia": "Canberra",
    "Hungary": "Budapest", "Cuba": "Havana", "Iran": "Tehran", "Iraq": "Baghdad", "Turkey": "Ankara",
    "Switzerland": "Bern", "Netherlands": "Amsterdam", "Indonesia": "Jakarta",
}

# Words for "Write the word 'x' in capital letters only.": plain nouns with no capital form of their own.
WORDS = tuple(
    "apple river window garden pencil mountain bottle candle rocket planet forest silver thunder island "
    "basket ladder mirror pocket rabbit castle dragon winter summer button jacket kitchen".split())


def singular(item: str, vocabulary: frozenset[str]) -> str:
    """`item` in the vocabulary's form when it is a regular plural of a word there, else `item`."""
    if item in vocabulary:
        return item
    for suffix, replacement in (("ies", "y"), ("es", ""), ("s", "")):
        if item.endswith(suffix) and item[: -len(suffix)] + replacement in vocabulary:
            return item[: -len(suffix)] + replacement
    return item
