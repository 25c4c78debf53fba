"""bAbI qa1–qa10 generator: a small world simulator that writes stories in the release's format.

Written from the task descriptions (Weston et al. 2016) and from statistics of the released files,
not from any generator code. Why generate at all: the release has 1k/10k questions per task and no
en-10k qa3 train file; a seeded generator gives unlimited fresh training stories, stories longer
than the release, and the missing file.

The world has actors, rooms and objects with a *true* state (everyone starts in a hidden random
room, objects lie in hidden random rooms). Each statement is one valid action on that state
(move to another room, get an object in the same room, drop a carried object, give it to someone
in the same room, ...), so a story is always consistent. The narrator tracks what the *stated* facts
prove; a question is asked only when its answer follows from them, with the supporting facts the
release would list. As in the release, a question may come after every second statement, only about
something stated in the last five statements (``WINDOW``); qa2 and qa3 skip some chances
(``ASK_PROBABILITY``), as the release does. Action weights and ask probabilities were fitted so
that story lengths and answer shares match the release (``python -m lm2_jax.data.stats``).

Surface forms are those of the release: ``went``/``journeyed``/``travelled``/``moved``/``went back``
``to the``; ``got``/``took``/``grabbed``/``picked up``; ``dropped``/``left``/``discarded``/``put
down`` (+ an optional `` there``); ``gave``/``passed``/``handed``; qa7 counts in words; qa8 lists
objects in the order the actor first picked them up; qa4 rooms lie on one north-south or east-west
line. The release's own quirk ``X is either in the A or the A.`` (qa10) is not reproduced.

Stories equal to a story of the vendored test file of the task are rejected and redrawn, so
generated training data never contains a test story (qa4 has only a few thousand possible stories).

``python -m lm2_jax.data.babi_gen --task qa3 --stories 2000 --out FILE`` writes a release-format file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from lm2_jax.data import babi
from lm2_jax.errors import DataError, MissingFileError

ACTORS = ("Mary", "John", "Daniel", "Sandra")
ACTORS_QA5 = ("Mary", "Fred", "Bill", "Jeff")
ACTORS_QA10 = ("Bill", "Mary", "Julie", "Fred")
ROOMS = ("bathroom", "hallway", "office", "kitchen", "garden", "bedroom")
ROOMS_QA10 = ("school", "park", "office", "cinema", "kitchen", "bedroom")
OBJECTS = ("football", "apple", "milk")
MOVE_VERBS = ("went", "journeyed", "travelled", "moved", "went back")
GET_VERBS = ("got", "took", "grabbed", "picked up")
DROP_VERBS = ("dropped", "left", "discarded", "put down")
GIVE_VERBS = ("gave", "passed", "handed")
NUMBER_WORDS = ("none", "one", "two", "three", "four", "five", "six")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
GENERATED_TASKS = tuple(f"qa{i}" for i in range(1, 11))
WINDOW = 5  # questions concern facts among the last WINDOW statements
STEP = 2  # statements between question attempts
# Chance to ask when a question is answerable (qa2/qa3: the release skips many chances).
ASK_PROBABILITY = {"qa2": 0.75, "qa3": 0.55}
QUESTIONS_PER_STORY = {task: 5 for task in GENERATED_TASKS} | {"qa4": 1}


@dataclasses.dataclass
class World:
    """True state plus what the stated facts prove, for one story."""

    rng: random.Random
    actors: Sequence[str]
    rooms: Sequence[str]
    objects: Sequence[str] = OBJECTS
    lines: list[babi.Line] = dataclasses.field(default_factory=list)
    statement_ids: list[int] = dataclasses.field(default_factory=list)
    room: dict[str, str] = dataclasses.field(default_factory=dict)  # actor -> true room
    place: dict[str, str] = dataclasses.field(default_factory=dict)  # free object -> true room
    holder: dict[str, str | None] = dataclasses.field(default_factory=dict)
    # knowledge: actor -> (kind, rooms, line id) of the last statement about where it is;
    # kind is 'at' (move / "is in"), 'not' (negation) or 'either' (qa10).
    known: dict[str, tuple[str, tuple[str, ...], int]] = dataclasses.field(default_factory=dict)
    moves: dict[str, list[tuple[int, str]]] = dataclasses.field(default_factory=dict)
    object_facts: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    # object -> rooms it was carried to, in order, (room, id of the carrier's move); None = a pick-up
    trajectory: dict[str, list[tuple[str, int] | None]] = dataclasses.field(default_factory=dict)
    # actor -> object -> ids of the facts that changed whether the actor carries it
    possession: dict[str, dict[str, list[int]]] = dataclasses.field(default_factory=dict)
    gives: list[tuple[int, str, str, str]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        for actor in self.actors:
            self.room[actor] = self.rng.choice(self.rooms)
            self.moves[actor] = []
            self.possession[actor] = {}
        for obj in self.objects:
            self.place[obj] = self.rng.choice(self.rooms)
            self.holder[obj] = None
            self.object_facts[obj] = []
            self.trajectory[obj] = []

    # -- narration ---------------------------------------------------------------------------
    def state(self, text: str) -> int:
        line_id = len(self.lines) + 1
        self.lines.append(babi.Line(line_id, text))
        self.statement_ids.append(line_id)
        return line_id

    def ask(self, text: str, answer: str, supporting: Sequence[int]) -> None:
        self.lines.append(babi.Line(len(self.lines) + 1, text, answer, tuple(supporting)))

    def recent(self, line_id: int) -> bool:
        return line_id in self.statement_ids[-WINDOW:]

    # -- actions ------------------------------------------------------------------------------
    def carried(self, actor: str) -> list[str]:
        return [o for o in self.objects if self.holder[o] == actor]

    def free_here(self, actor: str) -> list[str]:
        return [o for o in self.objects if self.holder[o] is None and self.place[o] == self.room[actor]]

    def others_here(self, actor: str) -> list[str]:
        return [a for a in self.actors if a != actor and self.room[a] == self.room[actor]]

    def move(self, actor: str, room: str, text: str | None = None) -> None:
        line_id = self.state(text or f"{actor} {self.rng.choice(MOVE_VERBS)} to the {room}.")
        self.room[actor] = room
        self.known[actor] = ("at", (room,), line_id)
        self.moves[actor].append((line_id, room))
        for obj in self.carried(actor):
            self.trajectory[obj].append((room, line_id))

    def move_randomly(self, actor: str) -> None:
        self.move(actor, self.rng.choice([r for r in self.rooms if r != self.room[actor]]))

    def get(self, actor: str, obj: str, there: float) -> None:
        suffix = " there" if self.rng.random() < there else ""
        line_id = self.state(f"{actor} {self.rng.choice(GET_VERBS)} the {obj}{suffix}.")
        self.holder[obj] = actor
        self._touch(actor, obj, line_id)
        # The "before" questions of qa3 follow one carrier's moves after its pick-up: the room it
        # was picked up in is not on the known path.
        self.trajectory[obj].append(None)

    def drop(self, actor: str, obj: str, there: float) -> None:
        suffix = " there" if self.rng.random() < there else ""
        line_id = self.state(f"{actor} {self.rng.choice(DROP_VERBS)} the {obj}{suffix}.")
        self.holder[obj] = None
        self.place[obj] = self.room[actor]
        self._touch(actor, obj, line_id)

    def give(self, actor: str, obj: str, receiver: str) -> None:
        line_id = self.state(f"{actor} {self.rng.choice(GIVE_VERBS)} the {obj} to {receiver}.")
        self.holder[obj] = receiver
        self._touch(actor, obj, line_id)
        self.possession[receiver].setdefault(obj, []).append(line_id)
        self.gives.append((line_id, actor, obj, receiver))

    def _touch(self, actor: str, obj: str, line_id: int) -> None:
        self.object_facts[obj].append(line_id)
        self.possession[actor].setdefault(obj, []).append(line_id)

    def act(self, weights: dict[str, float], there_get: float = 1.0, there_drop: float = 0.2) -> None:
        """One random valid action: the kind first (``weights`` of move/get/drop/give, among kinds
        some actor can do), then an actor who can do it."""
        able = {
            "move": self.actors,
            "get": [a for a in self.actors if self.free_here(a)],
            "drop": [a for a in self.actors if self.carried(a)],
            "give": [a for a in self.actors if self.carried(a) and self.others_here(a)],
        }
        kinds = [k for k in weights if able[k]]
        kind = self.rng.choices(kinds, [weights[k] for k in kinds])[0]
        actor = self.rng.choice(able[kind])
        if kind == "move":
            self.move_randomly(actor)
        elif kind == "get":
            self.get(actor, self.rng.choice(self.free_here(actor)), there_get)
        elif kind == "drop":
            self.drop(actor, self.rng.choice(self.carried(actor)), there_drop)
        else:
            self.give(actor, self.rng.choice(self.carried(actor)), self.rng.choice(self.others_here(actor)))

    # -- what the stated facts prove ----------------------------------------------------------
    def last_move_before(self, actor: str, line_id: int) -> tuple[int, str] | None:
        earlier = [m for m in self.moves[actor] if m[0] < line_id]
        return earlier[-1] if earlier else None

    def recent_actors(self) -> list[str]:
        return [a for a in self.actors if a in self.known and self.recent(self.known[a][2])]


Question = tuple[str, str, list[int]]


def _where_is(w: World) -> Question | None:
    actors = [a for a in w.recent_actors() if w.known[a][0] == "at"]
    if not actors:
        return None
    actor = w.rng.choice(actors)
    _, (room,), line_id = w.known[actor]
    return f"Where is {actor}?", room, [line_id]


_QA1_MOVE = re.compile(rf"^({'|'.join(ACTORS)}) (?:{'|'.join(MOVE_VERBS)}) to the ({'|'.join(ROOMS)})\.$")


def answerable_questions(sample: babi.Sample) -> list[tuple[str, str]]:
    """qa1: every ``(question, answer)`` the sample's context answers as this generator asks them,
    "Where is X?" for each person moved in the last ``WINDOW`` statements (their last move), most
    recent first; the sample's own question is among them. Other tasks: only the sample's own."""
    if sample.task != "qa1":
        return [(sample.question, sample.answer)]
    moves = [_QA1_MOVE.match(line) for line in sample.context]
    for line, move in zip(sample.context, moves):
        if move is None:
            raise DataError(f"qa1 sample {sample.question!r}: {line!r} is not a qa1 move")
    room = {m[1]: m[2] for m in moves}  # the last move of each person wins
    own = sample.question.removeprefix("Where is ").removesuffix("?")
    if room.get(own) != sample.answer:
        raise DataError(f"qa1 sample {sample.question!r}: its answer {sample.answer!r} is not {own}'s last move")
    recent = dict.fromkeys(m[1] for m in reversed(moves[-WINDOW:]))
    return [(f"Where is {actor}?", room[actor]) for actor in recent]


def _where_is_object(w: World) -> Question | None:
    """qa2: an object whose last fact is recent and whose carrier's room is known by a move."""
    options = []
    for obj in w.objects:
        facts = w.object_facts[obj]
        if not facts or not w.recent(facts[-1]):
            continue
        holder = w.holder[obj]
        if holder is not None:
            move = w.moves[holder][-1] if w.moves[holder] else None
        else:
            move = w.last_move_before(_actor_of(w, facts[-1]), facts[-1])
        if move is not None:
            options.append((f"Where is the {obj}?", move[1], [facts[-1], move[0]]))
    return w.rng.choice(options) if options else None


def _actor_of(w: World, line_id: int) -> str:
    return w.lines[line_id - 1].text.split(" ", 1)[0]


def _where_was_object(w: World) -> Question | None:
    """qa3: a recent object and a room on its known path (its last visit there) that it reached
    from another known room."""
    options = []
    for obj in w.objects:
        facts, path = w.object_facts[obj], w.trajectory[obj]
        if not facts or not w.recent(facts[-1]):
            continue
        last_visit = {p[0]: i for i, p in enumerate(path) if p is not None}
        for room, i in last_visit.items():
            if i > 0 and path[i - 1] is not None:
                here, before = path[i], path[i - 1]
                options.append((f"Where was the {obj} before the {room}?", before[0],
                                [facts[-1], here[1], before[1]]))
    return w.rng.choice(options) if options else None


def _give_question(w: World) -> Question | None:
    """qa5: one of five forms about a recent give that is the latest give matching the form."""
    forms: list[tuple[str, Callable[[tuple[int, str, str, str]], tuple], Callable[..., Question]]] = [
        ("what", lambda g: (g[1], g[3]), lambda i, a, o, r: (f"What did {a} give to {r}?", o, [i])),
        ("to", lambda g: (g[2], g[3]), lambda i, a, o, r: (f"Who gave the {o} to {r}?", a, [i])),
        ("gave", lambda g: (g[2],), lambda i, a, o, r: (f"Who gave the {o}?", a, [i])),
        ("whom", lambda g: (g[1], g[2]), lambda i, a, o, r: (f"Who did {a} give the {o} to?", r, [i])),
        ("received", lambda g: (g[2],), lambda i, a, o, r: (f"Who received the {o}?", r, [i])),
    ]
    name, key, render = w.rng.choices(forms, weights=[2, 1, 1, 1, 1])[0]
    del name
    latest: dict[tuple, tuple[int, str, str, str]] = {}
    for give in w.gives:
        latest[key(give)] = give
    options = [g for g in latest.values() if w.recent(g[0])]
    return render(*w.rng.choice(options)) if options else None


def _is_in(w: World) -> Question | None:
    """qa6/qa9/qa10: ``Is X in the R?`` with yes/no (and maybe) as the stated facts decide."""
    actors = w.recent_actors()
    if not actors:
        return None
    actor = w.rng.choice(actors)
    kind, rooms, line_id = w.known[actor]
    others = [r for r in w.rooms if r not in rooms]
    if kind == "not":
        room, answer = rooms[0], "no"
    elif kind == "either":
        room = w.rng.choice(rooms) if w.rng.random() < 0.58 else w.rng.choice(others)
        answer = "maybe" if room in rooms else "no"
    else:
        room = rooms[0] if w.rng.random() < 0.5 else w.rng.choice(others)
        answer = "yes" if room == rooms[0] else "no"
    return f"Is {actor} in the {room}?", answer, [line_id]


def _carrying(w: World, as_list: bool) -> Question | None:
    """qa7 (count) / qa8 (list, in order of first pick-up); supports: all possession facts."""
    actors = [a for a in w.actors if w.possession[a]
              and w.recent(max(i for ids in w.possession[a].values() for i in ids))]
    if not actors:
        return None
    actor = w.rng.choice(actors)
    history = w.possession[actor]  # insertion order = order of first acquisition
    held = [o for o in history if w.holder[o] == actor]
    if as_list:
        supporting = [i for ids in history.values() for i in ids]
        return f"What is {actor} carrying?", ",".join(held) or "nothing", supporting
    supporting = sorted(i for ids in history.values() for i in ids)
    return f"How many objects is {actor} carrying?", NUMBER_WORDS[len(held)], supporting


def _negation_statement(w: World) -> None:
    """qa9: a move, ``X is in the R.``, or ``X is (no longer|not) in the R.`` (R: where X was)."""
    actor = w.rng.choice(w.actors)
    kind = w.rng.choices(["move", "is", "not"], [2, 1, 1])[0]
    if kind == "move":
        w.move_randomly(actor)
    elif kind == "is":
        room = w.rng.choice([r for r in w.rooms if r != w.room[actor]])
        w.move(actor, room, f"{actor} is in the {room}.")
    else:
        left = w.room[actor]
        line_id = w.state(f"{actor} is {w.rng.choice(['no longer', 'not'])} in the {left}.")
        w.room[actor] = w.rng.choice([r for r in w.rooms if r != left])
        w.known[actor] = ("not", (left,), line_id)


def _indefinite_statement(w: World) -> None:
    """qa10: a move, ``X is in the R.``, or ``X is either in the A or the B.`` (one is true)."""
    actor = w.rng.choice(w.actors)
    kind = w.rng.choices(["move", "is", "either"], [2, 1, 1])[0]
    if kind == "move":
        w.move_randomly(actor)
        return
    room = w.rng.choice([r for r in w.rooms if r != w.room[actor]])
    if kind == "is":
        w.move(actor, room, f"{actor} is in the {room}.")
        return
    other = w.rng.choice([r for r in w.rooms if r not in (room, w.room[actor])])
    a, b = w.rng.sample([room, other], 2)
    line_id = w.state(f"{actor} is either in the {a} or the {b}.")
    w.room[actor] = room
    w.known[actor] = ("either", (a, b), line_id)


def _relations_story(rng: random.Random) -> list[babi.Line]:
    """qa4: three rooms on a line; both adjacencies stated; one asked in one of two forms."""
    first, middle, last = rng.sample(ROOMS, 3)
    direction = rng.choice(["north", "east"])
    statements = []
    for outer, d in ((first, direction), (last, OPPOSITE[direction])):  # outer is d of middle
        if rng.random() < 2 / 3:
            statements.append((outer, d, middle))
        else:
            statements.append((middle, OPPOSITE[d], outer))
    rng.shuffle(statements)
    lines = [babi.Line(i + 1, f"The {a} is {d} of the {b}.") for i, (a, d, b) in enumerate(statements)]
    asked = rng.randrange(2)
    a, d, b = statements[asked]
    if rng.random() < 0.5:
        a, d, b = b, OPPOSITE[d], a
    if rng.random() < 0.5:
        text, answer = f"What is {d} of the {b}?", a
    else:
        text, answer = f"What is the {a} {d} of?", b
    lines.append(babi.Line(3, text, answer, (asked + 1,)))
    return lines


# Relative weights of the actions (among those possible), fitted so that action shares, story
# lengths and answers match the release (see lm2_jax.data.stats).
_MOVE_GET_DROP = {"move": 6.0, "get": 2.5, "drop": 2.0}
_WEIGHTS_QA5 = {"move": 6.0, "get": 2.5, "drop": 2.0, "give": 8.0}
_WEIGHTS_QA7 = {"move": 6.0, "get": 2.5, "drop": 3.0, "give": 8.0}

# task -> (actors, rooms, one statement, question or None)
Statement = Callable[[World], None]
Asker = Callable[[World], Question | None]
_TASKS: dict[str, tuple[Sequence[str], Sequence[str], Statement, Asker]] = {
    "qa1": (ACTORS, ROOMS, lambda w: w.move_randomly(w.rng.choice(w.actors)), _where_is),
    "qa2": (ACTORS, ROOMS, lambda w: w.act(_MOVE_GET_DROP), _where_is_object),
    "qa3": (ACTORS, ROOMS, lambda w: w.act(_MOVE_GET_DROP, there_get=0.2), _where_was_object),
    "qa5": (ACTORS_QA5, ROOMS, lambda w: w.act(_WEIGHTS_QA5), _give_question),
    "qa6": (ACTORS, ROOMS, lambda w: w.act(_MOVE_GET_DROP), _is_in),
    "qa7": (ACTORS, ROOMS, lambda w: w.act(_WEIGHTS_QA7), lambda w: _carrying(w, as_list=False)),
    "qa8": (ACTORS, ROOMS, lambda w: w.act(_MOVE_GET_DROP), lambda w: _carrying(w, as_list=True)),
    "qa9": (ACTORS, ROOMS, _negation_statement, _is_in),
    "qa10": (ACTORS_QA10, ROOMS_QA10, _indefinite_statement, _is_in),
}


def _draw_story(task: str, rng: random.Random, n_questions: int) -> list[babi.Line]:
    if task == "qa4":
        return _relations_story(rng)
    actors, rooms, statement, question = _TASKS[task]
    w = World(rng, actors, rooms)
    asked = 0
    while asked < n_questions:
        if len(w.statement_ids) > 200 * n_questions:
            raise RuntimeError(f"{task}: no answerable question after {len(w.statement_ids)} statements")
        for _ in range(STEP):
            statement(w)
        q = question(w)
        if q is not None and w.rng.random() < ASK_PROBABILITY.get(task, 1.0):
            w.ask(*q)
            asked += 1
    return w.lines


@functools.cache
def _test_stories(task: str) -> frozenset[tuple[str, ...]]:
    """Story keys of the vendored test file of ``task`` (generated stories must avoid them)."""
    return frozenset(story_key(s) for s in babi.read_stories(babi.task_file(task, "test")))


def story_key(story: Sequence[babi.Line]) -> tuple[str, ...]:
    return tuple(line.format() for line in story)


def generate_story(task: str, seed: int, index: int, n_questions: int | None = None) -> tuple[babi.Line, ...]:
    """Story ``index`` of the stream for ``(task, seed)``: deterministic, never a test story.

    ``n_questions`` (default: as in the release, 5; qa4: 1) makes stories longer: the world goes on
    and more questions are asked.
    """
    task = babi.canonical_task(task)
    if task not in GENERATED_TASKS:
        raise DataError(f"no generator for bAbI task {task!r}; generated tasks: {', '.join(GENERATED_TASKS)}")
    n = QUESTIONS_PER_STORY[task] if n_questions is None else n_questions
    if n < 1 or (task == "qa4" and n != 1):
        raise DataError(f"n_questions must be >= 1 (exactly 1 for qa4), got {n_questions}")
    forbidden = _test_stories(task)
    for attempt in range(1000):
        story = _draw_story(task, random.Random(f"babi/{task}/{seed}/{index}/{attempt}"), n)
        if story_key(story) not in forbidden:
            return tuple(story)
    raise RuntimeError(f"{task}: 1000 draws in a row equal test stories")  # pragma: no cover


def generate_samples(task: str, seed: int, index: int, n_questions: int | None = None) -> list[babi.Sample]:
    """The samples (one per question) of story ``index``."""
    task = babi.canonical_task(task)
    return babi.story_samples(generate_story(task, seed, index, n_questions), task)


def generated_sample(task: str, seed: int, index: int) -> babi.Sample:
    """Record ``index`` of an unlimited sample stream: question ``index % q`` of story ``index // q``."""
    q = QUESTIONS_PER_STORY[babi.canonical_task(task)]
    return generate_samples(task, seed, index // q)[index % q]


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm2_jax.data.babi_gen", description=__doc__)
    parser.add_argument("--task", required=True, help="qa1 ... qa10")
    parser.add_argument("--stories", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--questions", type=int, default=None, help="questions per story")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    task = babi.canonical_task(args.task)
    if not args.out.parent.is_dir():
        raise MissingFileError(f"--out={args.out}: no directory {args.out.parent}")
    with open(args.out, "w", encoding="utf-8") as f:
        for index in range(args.stories):
            f.writelines(babi.format_story(generate_story(task, args.seed, index, args.questions), task))


if __name__ == "__main__":
    from lm2_jax import cli

    cli.run_argparse(_main)
