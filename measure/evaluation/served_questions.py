"""Short questions with known answers for the served black-box check (`served.py`): graded
arithmetic (`arithmetic.py`'s levels) and capitals of countries, generated from a seed, graded by
code. Nothing is downloaded; the capitals are public facts listed here.

A response to an arithmetic question is right when its stated answer (`labels.stated_answer`)
equals the exact value; to a capital question, when the capital (or one of its accepted names)
appears in it as a whole word, case-insensitively.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from fractions import Fraction

from measure.evaluation.arithmetic import problems
from measure.evaluation.labels import stated_answer

CAPITAL_INSTRUCTION = "Answer with the name of the city only."
# (country, capital, other accepted names)
CAPITALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("France", "Paris", ()),
    ("Germany", "Berlin", ()),
    ("Italy", "Rome", ()),
    ("Spain", "Madrid", ()),
    ("Portugal", "Lisbon", ()),
    ("the United Kingdom", "London", ()),
    ("Ireland", "Dublin", ()),
    ("the Netherlands", "Amsterdam", ()),
    ("Belgium", "Brussels", ()),
    ("Switzerland", "Bern", ("Berne",)),
    ("Austria", "Vienna", ()),
    ("Poland", "Warsaw", ()),
    ("the Czech Republic", "Prague", ()),
    ("Hungary", "Budapest", ()),
    ("Greece", "Athens", ()),
    ("Sweden", "Stockholm", ()),
    ("Norway", "Oslo", ()),
    ("Finland", "Helsinki", ()),
    ("Denmark", "Copenhagen", ()),
    ("Iceland", "Reykjavik", ("Reykjavík",)),
    ("Russia", "Moscow", ()),
    ("Ukraine", "Kyiv", ("Kiev",)),
    ("Romania", "Bucharest", ()),
    ("Bulgaria", "Sofia", ()),
    ("Serbia", "Belgrade", ()),
    ("Croatia", "Zagreb", ()),
    ("Slovakia", "Bratislava", ()),
    ("Slovenia", "Ljubljana", ()),
    ("Lithuania", "Vilnius", ()),
    ("Latvia", "Riga", ()),
    ("Estonia", "Tallinn", ()),
    ("Turkey", "Ankara", ()),
    ("Egypt", "Cairo", ()),
    ("Morocco", "Rabat", ()),
    ("Algeria", "Algiers", ()),
    ("Tunisia", "Tunis", ()),
    ("Nigeria", "Abuja", ()),
    ("Kenya", "Nairobi", ()),
    ("Ethiopia", "Addis Ababa", ()),
    ("Ghana", "Accra", ()),
    ("Senegal", "Dakar", ()),
    ("Uganda", "Kampala", ()),
    ("Tanzania", "Dodoma", ()),
    ("Zimbabwe", "Harare", ()),
    ("Angola", "Luanda", ()),
    ("Madagascar", "Antananarivo", ()),
    ("Japan", "Tokyo", ()),
    ("China", "Beijing", ("Peking",)),
    ("South Korea", "Seoul", ()),
    ("India", "New Delhi", ()),
    ("Pakistan", "Islamabad", ()),
    ("Bangladesh", "Dhaka", ()),
    ("Nepal", "Kathmandu", ()),
    ("Thailand", "Bangkok", ()),
    ("Vietnam", "Hanoi", ()),
    ("Indonesia", "Jakarta", ()),
    ("the Philippines", "Manila", ()),
    ("Malaysia", "Kuala Lumpur", ()),
    ("Mongolia", "Ulaanbaatar", ("Ulan Bator",)),
    ("Iran", "Tehran", ()),
    ("Iraq", "Baghdad", ()),
    ("Saudi Arabia", "Riyadh", ()),
    ("Israel", "Jerusalem", ()),
    ("Jordan", "Amman", ()),
    ("Syria", "Damascus", ()),
    ("Lebanon", "Beirut", ()),
    ("Afghanistan", "Kabul", ()),
    ("Kazakhstan", "Astana", ()),
    ("Uzbekistan", "Tashkent", ()),
    ("the United States", "Washington", ("Washington, D.C.",)),
    ("Canada", "Ottawa", ()),
    ("Mexico", "Mexico City", ()),
    ("Cuba", "Havana", ()),
    ("Jamaica", "Kingston", ()),
    ("Brazil", "Brasília", ("Brasilia",)),
    ("Argentina", "Buenos Aires", ()),
    ("Chile", "Santiago", ()),
    ("Peru", "Lima", ()),
    ("Colombia", "Bogotá", ("Bogota",)),
    ("Venezuela", "Caracas", ()),
    ("Ecuador", "Quito", ()),
    ("Bolivia", "Sucre", ("La Paz",)),
    ("Paraguay", "Asunción", ("Asuncion",)),
    ("Uruguay", "Montevideo", ()),
    ("Australia", "Canberra", ()),
    ("New Zealand", "Wellington", ()),
)


@dataclass(frozen=True)
class Question:
    kind: str  # "arithmetic" | "capital"
    prompt: str
    answer: str
    level: int  # arithmetic level 1..8; 0 for capitals

    def as_dict(self) -> dict:
        return asdict(self)

    def wrong(self, response: str) -> int:
        """1 when `response` does not give the answer, else 0."""
        if self.kind == "arithmetic":
            got = stated_answer(response)
            return int(got is None or got != Fraction(self.answer))
        names = (self.answer, *dict((c, a) for _, c, a in CAPITALS).get(self.answer, ()))
        text = response.casefold()
        return int(not any(re.search(rf"\b{re.escape(n.casefold())}\b", text) for n in names))


def questions(n: int, seed: int) -> list[Question]:
    """n questions, half arithmetic (levels round-robin) and half capitals (at most one per
    country), in an order shuffled by `seed`. ValueError when n asks for more capitals than listed."""
    if n < 2:
        raise ValueError(f"--questions must be at least 2, got {n}")
    n_capitals = n // 2
    if n_capitals > len(CAPITALS):
        raise ValueError(f"--questions: at most {2 * len(CAPITALS)} (there are {len(CAPITALS)} capitals)")
    r = random.Random(seed)
    out = [Question("arithmetic", p.prompt(), str(p.answer), p.level) for p in problems(n - n_capitals, seed)]
    for country, capital, _ in r.sample(CAPITALS, n_capitals):
        out.append(
            Question("capital", f"What is the capital of {country}? {CAPITAL_INSTRUCTION}", capital, 0)
        )
    r.shuffle(out)
    return out
