"""The pick-and-place task family of the simulated arm: scenes, physics, phases and success.

A scene holds a few coloured blocks and a few coloured plates on the table; the prompt names one
block and one plate ("put the red block on the blue plate"), the others are distractors. The
gripper grasps the block nearest to it when it closes within reach of one, carries it, and drops
it where it opens. The task is done when the named block rests on the named plate.

The phase is the simulator's own account of progress, a function of the scene and the gripper's
position alone: reach (the named block is out of the gripper's reach), grasp (within reach), move
(held, away from the plate), release (held over the plate), done. Each phase has a subtask text, the
language Pi0.5 learns to generate and to condition its actions on. Colour, block and plate names are
pieces of the shipped tiny tokenizer, so the texts stay short.
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


@dataclasses.dataclass
class Scene:
    """Where everything is. blocks: (N, 2) centres in metres; plates: (M, 2); `target` and `goal`
    index the named block and plate; `held` is the index of the block in the gripper, if any."""

    blocks: np.ndarray
    block_colours: tuple[str, ...]
    plates: np.ndarray
    plate_colours: tuple[str, ...]
    target: int
    goal: int
    held: int | None = None

    def copy(self) -> Scene:
        return dataclasses.replace(self, blocks=self.blocks.copy(), plates=self.plates.copy())


@dataclasses.dataclass(frozen=True)
class PickPlaceTask:
    """Put the named block on the named plate, among distractors.

    Sizes in metres. Blocks and plates are placed in the arm's reach (`min_radius`..`max_radius`
    from the base, in the half-plane in front of it), apart from each other by `min_gap`.
    """

    n_blocks: int = 3
    n_plates: int = 2
    block_half: float = 0.07
    plate_radius: float = 0.13
    grasp_radius: float = 0.07  # the gripper grasps a block whose centre is this close
    min_radius: float = 0.35
    max_radius: float = 0.85
    min_gap: float = 0.3
    close_at: float = 0.9  # gripper command at or above which it holds
    open_at: float = 0.3  # at or below which it lets go

    def __post_init__(self) -> None:
        if not 1 <= self.n_blocks <= len(COLOURS) or not 1 <= self.n_plates <= len(COLOURS):
            raise ValueError(f"a scene has 1..{len(COLOURS)} blocks and plates, got {self.n_blocks}, {self.n_plates}")

    def new_scene(self, rng: np.random.Generator) -> Scene:
        """A random scene: positions apart from each other, colours distinct among blocks and plates."""
        while True:
            angles = rng.uniform(0.12 * np.pi, 0.88 * np.pi, self.n_blocks + self.n_plates)
            radii = rng.uniform(self.min_radius, self.max_radius, self.n_blocks + self.n_plates)
            points = np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]
            gaps = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(len(points)) * 1e9
            if gaps.min() >= self.min_gap:
                break
        names = list(COLOURS)
        block_colours = tuple(names[i] for i in rng.permutation(len(names))[: self.n_blocks])
        plate_colours = tuple(names[i] for i in rng.permutation(len(names))[: self.n_plates])
        return Scene(
            blocks=points[: self.n_blocks],
            block_colours=block_colours,
            plates=points[self.n_blocks :],
            plate_colours=plate_colours,
            target=int(rng.integers(self.n_blocks)),
            goal=int(rng.integers(self.n_plates)),
        )

    # ------------------------------------------------------------------ language

    def prompt(self, scene: Scene) -> str:
        return f"put the {scene.block_colours[scene.target]} block on the {scene.plate_colours[scene.goal]} plate"

    def subtask(self, scene: Scene, phase: str) -> str:
        block = f"the {scene.block_colours[scene.target if scene.held is None else scene.held]} block"
        plate = f"the {scene.plate_colours[scene.goal]} plate"
        texts = {
            "reach": f"reach for {block}",
            "grasp": f"grasp {block}",
            "move": f"move {block} to {plate}",
            "release": f"release {block}",
            "done": "done",
        }
        return texts[phase]

    # ------------------------------------------------------------------ physics and progress

    def update(self, scene: Scene, ee: np.ndarray, gripper: float) -> None:
        """One tick after the arm moved: a held block follows the gripper; a closing gripper grasps
        the nearest block in reach; an opening one drops its block where it is."""
        if scene.held is not None:
            scene.blocks[scene.held] = ee
            if gripper <= self.open_at:
                scene.held = None
        elif gripper >= self.close_at:
            dist = np.linalg.norm(scene.blocks - ee, axis=1)
            nearest = int(np.argmin(dist))
            if dist[nearest] <= self.grasp_radius:
                scene.held = nearest
                scene.blocks[nearest] = ee

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
