"""The pick-and-place task family of the simulated arm: scenes, physics, phases and success.

A scene holds three coloured blocks and a coloured plate on the table; the prompt names one block
and the plate ("put the red block on the blue plate"), the other blocks are distractors. The
blocks stand in three of four places along the back of the table and the plate in one of two
places in front, each moved by up to `jitter`, places and colours drawn per episode, as a lab
bench has its stations (LIBERO-Goal's scenes are laid out this way): which place holds the named
colour is for the cameras to find. Closing fingers that reach `grip_at` with a block within
`grasp_radius` grasp the nearest one and stop on it; the gripper carries it and drops it where its
fingers open past `open_at`. Fingers that close on nothing close fully, and must open before they
can grasp. The task is done when the named block rests
on the named plate.

The phase is the simulator's own account of progress, a function of the scene and the gripper's
position alone: reach (the named block is out of the gripper's reach), grasp (within reach), move
(held, away from the plate), release (held over the plate), done. Each phase has a subtask text, the
language Pi0.5 learns to generate and to condition its actions on. The texts of the phases that go
somewhere name the place, numbered from the left ("reach for the red block at 3"): to say it the
backbone must find the named colour in the cameras, a cross-entropy signal on exactly the grounding
the policy needs (PaliGemma's localisation output in miniature), and the action expert then knows
where to go. Colour, block and plate names and the digits are pieces of the shipped tiny tokenizer,
so the texts stay short.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from robots.sim import Shape

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "blue": (40, 75, 210),
    "green": (30, 150, 60),
    "black": (25, 25, 25),
}
PHASES = ("reach", "grasp", "move", "release", "done")
# Where blocks and plates stand (metres, the arm's base at the origin), numbered from the left: a
# row of four block places (three hold a block) and two plate places in front (one holds the plate),
# each at the centre of a 12-pixel patch of the overhead camera at 48 pixels (`robots.sim.BASE_VIEW`),
# so a patch shows one object whole.
BLOCK_PLACES = np.array([[-0.6, 0.7], [-0.2, 0.7], [0.2, 0.7], [0.6, 0.7]])
PLATE_PLACES = np.array([[-0.6, 0.3], [0.6, 0.3]])
N_BLOCKS = 3
N_PLATES = 1


def without_place(text: str) -> str:
    """A subtask text without the place it names ("reach for the red block at 3" -> "reach for the
    red block"): what says which phase it is."""
    head, _, place = text.rpartition(" at ")
    return head if head and place.isdigit() else text


@dataclasses.dataclass
class Scene:
    """Where everything is. blocks: (N, 2) centres in metres; plates: (M, 2); `target` and `goal`
    index the named block and plate; `places` and `plate_places` say which place each block stood in
    at the start and each plate lies in; `held` is the index of the block in the gripper, if any."""

    blocks: np.ndarray
    block_colours: tuple[str, ...]
    plates: np.ndarray
    plate_colours: tuple[str, ...]
    target: int
    goal: int
    places: tuple[int, ...]  # the block places (`BLOCK_PLACES` rows) the blocks stand in
    plate_places: tuple[int, ...]  # and the plate places (`PLATE_PLACES` rows) the plates lie in
    held: int | None = None

    def copy(self) -> Scene:
        return dataclasses.replace(self, blocks=self.blocks.copy(), plates=self.plates.copy())


@dataclasses.dataclass(frozen=True)
class PickPlaceTask:
    """Put the named block on the named plate, among distractors. Sizes in metres."""

    block_half: float = 0.11
    plate_radius: float = 0.13
    grasp_radius: float = 0.1  # the gripper grasps a block whose centre is this close (it is over it)
    jitter: float = 0.04  # each block and plate lies up to this far from its place, in x and in y
    grip_at: float = 0.6  # closure at which closing fingers meet a block (and stop, holding it)
    open_at: float = 0.3  # closure at or below which opening fingers let go

    def new_scene(self, rng: np.random.Generator) -> Scene:
        """A random scene: colours drawn for the places (distinct among blocks and among plates),
        each object jittered about its place, one block and one plate named."""
        names = list(COLOURS)
        places = np.sort(rng.permutation(len(BLOCK_PLACES))[:N_BLOCKS])
        plate_places = np.sort(rng.permutation(len(PLATE_PLACES))[:N_PLATES])
        blocks = BLOCK_PLACES[places] + rng.uniform(-self.jitter, self.jitter, (N_BLOCKS, 2))
        plates = PLATE_PLACES[plate_places] + rng.uniform(-self.jitter, self.jitter, (N_PLATES, 2))
        block_colours = tuple(names[i] for i in rng.permutation(len(names))[:N_BLOCKS])
        plate_colours = tuple(names[i] for i in rng.permutation(len(names))[:N_PLATES])
        return Scene(
            blocks=blocks,
            block_colours=block_colours,
            plates=plates,
            plate_colours=plate_colours,
            target=int(rng.integers(N_BLOCKS)),
            goal=int(rng.integers(N_PLATES)),
            places=tuple(int(i) for i in places),
            plate_places=tuple(int(i) for i in plate_places),
        )

    # ------------------------------------------------------------------ language

    def prompt(self, scene: Scene) -> str:
        return f"put the {scene.block_colours[scene.target]} block on the {scene.plate_colours[scene.goal]} plate"

    def subtask(self, scene: Scene, phase: str) -> str:
        """The phase's text; reach and move name the place they go to (1 = leftmost)."""
        block = f"the {scene.block_colours[scene.target if scene.held is None else scene.held]} block"
        plate = f"the {scene.plate_colours[scene.goal]} plate"
        texts = {
            "reach": f"reach for {block} at {scene.places[scene.target] + 1}",
            "grasp": f"grasp {block}",
            "move": f"move {block} to {plate} at {scene.plate_places[scene.goal] + 1}",
            "release": f"release {block}",
            "done": "done",
        }
        return texts[phase]

    # ------------------------------------------------------------------ physics and progress

    def update(self, scene: Scene, ee: np.ndarray, before: float, closure: float) -> float:
        """One tick after the arm moved and its fingers went from closure `before` toward `closure`:
        a held block follows the gripper; fingers closing through `grip_at` grasp the nearest block
        in reach and stop on it; opening ones drop their block where it is. Returns where the
        fingers are: fingers that closed on nothing go on to 1, so the robot can tell (its state
        says so) and so can the policy."""
        if scene.held is not None:
            scene.blocks[scene.held] = ee
            if closure <= self.open_at:
                scene.held = None
                return closure
            return min(closure, self.grip_at)
        if before < self.grip_at <= closure:
            dist = np.linalg.norm(scene.blocks - ee, axis=1)
            nearest = int(np.argmin(dist))
            if dist[nearest] <= self.grasp_radius:
                scene.held = nearest
                scene.blocks[nearest] = ee
                return self.grip_at
        return closure

    def on_goal(self, scene: Scene, block: int) -> bool:
        return bool(np.linalg.norm(scene.blocks[block] - scene.plates[scene.goal]) <= self.plate_radius)

    def success(self, scene: Scene) -> bool:
        return scene.held is None and self.on_goal(scene, scene.target)

    def phase(self, scene: Scene, ee: np.ndarray) -> str:
        if self.success(scene):
            return "done"
        if scene.held is not None:
            return "release" if scene.held != scene.target or self.on_goal(scene, scene.held) else "move"
        near = np.linalg.norm(scene.blocks[scene.target] - ee) <= self.grasp_radius
        return "grasp" if near else "reach"

    # ------------------------------------------------------------------ rendering

    def shapes(self, scene: Scene) -> list[Shape]:
        """Plates (pale discs) under blocks (saturated squares); a held block is drawn last."""
        out = [
            Shape("disc", p, self.plate_radius, 0.55 * np.array(COLOURS[c], np.float32) + 0.45 * 255)
            for p, c in zip(scene.plates, scene.plate_colours, strict=True)
        ]
        order = [i for i in range(len(scene.blocks)) if i != scene.held]
        order += [] if scene.held is None else [scene.held]
        out += [
            Shape("square", scene.blocks[i], self.block_half, np.array(COLOURS[scene.block_colours[i]], np.float32))
            for i in order
        ]
        return out


# The tasks a simulated arm can run, by the name a model config's `trained_task` gives.
TASKS: dict[str, type[PickPlaceTask]] = {"pick-place": PickPlaceTask}
