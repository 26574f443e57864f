"""Sudoku boards: parsing and validation, a bitmask backtracking solver, and a generator of unique puzzles.

A board is a string of 81 characters, row by row, '1'-'9' for digits and '.' (or '0') for blanks. The solver keeps
one 9-bit mask of used digits per row, column and box; it always branches on the blank cell with the fewest
candidates and fills forced cells (one candidate) without branching, which keeps uniqueness checks of puzzles in
the 24-40 clue range to a few hundred search nodes.

Generation: a random complete grid (the solver with random digit order), then cells are removed in random order,
each removal kept only if the puzzle stays uniquely solvable, until the requested clue count; if the puzzle
becomes minimal before that, a new grid is tried. Uniqueness after removing cell i (digit d) is checked as "no
solution with cell i != d" (the original solution is known to exist), which is cheaper than counting solutions.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

DIGITS = "123456789"
BLANKS = ".0"
ROW = [i // 9 for i in range(81)]
COL = [i % 9 for i in range(81)]
BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
POPCOUNT = [bin(m).count("1") for m in range(512)]
BITS = [[d for d in range(9) if m >> d & 1] for m in range(512)]  # digit indices (0-8) in a mask


class BoardError(ValueError):
    """A Sudoku string that is not a valid puzzle."""


# ---------------------------------------------------------------- format
def parse(s: str, *, what: str = "puzzle") -> list[int]:
    """81 characters -> 81 ints (0 = blank). Raises BoardError for a wrong length, a bad character, or givens that
    break a row, column or box."""
    if not isinstance(s, str):
        raise BoardError(f"the {what} must be a string of 81 characters")
    s = "".join(s.split())  # allow whitespace / line breaks between cells
    if len(s) != 81:
        raise BoardError(f"the {what} must have 81 cells (digits 1-9, '.' or '0' for blanks), got {len(s)}")
    bad = sorted({c for c in s if c not in DIGITS and c not in BLANKS})
    if bad:
        raise BoardError(f"the {what} has invalid character(s) {''.join(bad)!r}: use digits 1-9 and '.' or '0'")
    cells = [0 if c in BLANKS else int(c) for c in s]
    clash = conflict(cells)
    if clash:
        raise BoardError(f"the {what}'s givens contradict each other: {clash}")
    return cells


def conflict(cells: list[int]) -> str | None:
    """A description of the first repeated digit in a row, column or box, or None."""
    for name, key in (("row", ROW), ("column", COL), ("box", BOX)):
        seen: dict[tuple[int, int], int] = {}
        for i, v in enumerate(cells):
            if v:
                k = (key[i], v)
                if k in seen:
                    return f"digit {v} appears twice in {name} {key[i] + 1} (cells {seen[k] + 1} and {i + 1})"
                seen[k] = i
    return None


def to_string(cells: list[int], blank: str = ".") -> str:
    return "".join(str(v) if v else blank for v in cells)


def pretty(cells: list[int] | str, blank: str = ".") -> str:
    """A 9x9 grid with box separators, for terminals."""
    s = cells if isinstance(cells, str) else to_string(cells, blank)
    lines = []
    for r in range(9):
        if r and r % 3 == 0:
            lines.append("------+-------+------")
        row = s[9 * r:9 * r + 9]
        lines.append(" | ".join(" ".join(row[c:c + 3]) for c in (0, 3, 6)))
    return "\n".join(lines)


def is_solution(puzzle: list[int], solution: list[int]) -> bool:
    """A complete, valid grid that keeps every given of the puzzle."""
    if len(solution) != 81 or any(not 1 <= v <= 9 for v in solution):
        return False
    if any(p and p != s for p, s in zip(puzzle, solution)):
        return False
    return conflict(solution) is None


# ---------------------------------------------------------------- solver
def _masks(cells: list[int]) -> tuple[list[int], list[int], list[int], list[int]] | None:
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    empty = []
    for i, v in enumerate(cells):
        if v:
            b = 1 << (v - 1)
            r, c, x = ROW[i], COL[i], BOX[i]
            if (rows[r] | cols[c] | boxes[x]) & b:
                return None
            rows[r] |= b
            cols[c] |= b
            boxes[x] |= b
        else:
            empty.append(i)
    return rows, cols, boxes, empty


def solve(cells: list[int], limit: int = 2, *, ban: tuple[int, int] | None = None,
          rng: random.Random | None = None) -> list[list[int]]:
    """Up to `limit` solutions of `cells` (81 ints, 0 = blank).

    ban=(cell, digit) excludes that digit at that cell. rng shuffles the order digits are tried in (to build
    random grids). The search is iterative (an explicit stack), so deep puzzles cannot hit Python's recursion limit.
    """
    st = _masks(cells)
    if st is None:
        return []
    rows, cols, boxes, empty = st
    grid = list(cells)
    ban_cell, ban_bit = (ban[0], 1 << (ban[1] - 1)) if ban else (-1, 0)
    solutions: list[list[int]] = []
    # Each frame: (cell, remaining candidate digits, the digit placed now or -1, forced cells filled after it)
    stack: list[list] = []
    n_empty = len(empty)
    filled: set[int] = set()

    def place(i: int, d: int) -> None:
        b = 1 << d
        rows[ROW[i]] |= b
        cols[COL[i]] |= b
        boxes[BOX[i]] |= b
        grid[i] = d + 1
        filled.add(i)

    def unplace(i: int, d: int) -> None:
        b = ~(1 << d)
        rows[ROW[i]] &= b
        cols[COL[i]] &= b
        boxes[BOX[i]] &= b
        grid[i] = 0
        filled.discard(i)

    def candidates(i: int) -> int:
        m = ~(rows[ROW[i]] | cols[COL[i]] | boxes[BOX[i]]) & 511
        return m & ~ban_bit if i == ban_cell else m

    def choose() -> tuple[int, int, list[tuple[int, int]]] | None:
        """Fill forced cells; return (cell, candidate mask, forced fills) of the best branch point, or
        (-1, 0, forced) when the grid is full, or None on a contradiction (forced fills undone)."""
        forced: list[tuple[int, int]] = []
        while True:
            best, best_mask, best_n, progress = -1, 0, 10, False
            for i in empty:
                if i in filled:
                    continue
                m = candidates(i)
                n = POPCOUNT[m]
                if n == 0:
                    for j, d in reversed(forced):
                        unplace(j, d)
                    return None
                if n == 1:
                    d = BITS[m][0]
                    place(i, d)
                    forced.append((i, d))
                    progress = True
                elif n < best_n:
                    best, best_mask, best_n = i, m, n
            if not progress:
                return best, best_mask, forced

    res = choose()
    if res is None:
        return []
    cell, mask, forced = res
    base_forced = forced
    if cell == -1:
        return [list(grid)] if len(filled) == n_empty else []
    digits = BITS[mask][:]
    if rng is not None:
        rng.shuffle(digits)
    stack.append([cell, digits, -1, []])
    while stack:
        frame = stack[-1]
        cell, digits, placed, forced = frame
        for j, d in reversed(forced):
            unplace(j, d)
        if placed >= 0:
            unplace(cell, placed)
        frame[2], frame[3] = -1, []
        if not digits:
            stack.pop()
            continue
        d = digits.pop()
        place(cell, d)
        frame[2] = d
        res = choose()
        if res is None:
            continue
        nxt, mask, forced = res
        frame[3] = forced
        if nxt == -1:
            solutions.append(list(grid))
            if len(solutions) >= limit:
                break
            continue
        ds = BITS[mask][:]
        if rng is not None:
            rng.shuffle(ds)
        stack.append([nxt, ds, -1, []])
    del base_forced
    return solutions


def count_solutions(cells: list[int], limit: int = 2) -> int:
    return len(solve(cells, limit))


def has_unique_solution(cells: list[int]) -> bool:
    return count_solutions(cells, 2) == 1


# ---------------------------------------------------------------- generator
def random_grid(rng: random.Random) -> list[int]:
    """A uniformly shuffled search for a complete valid grid."""
    cells = [0] * 81
    # Seed the three diagonal boxes with random permutations (they never conflict), then search the rest.
    for b in (0, 4, 8):
        digits = rng.sample(range(1, 10), 9)
        for k, i in enumerate(i for i in range(81) if BOX[i] == b):
            cells[i] = digits[k]
    return solve(cells, 1, rng=rng)[0]


def make_puzzle(clues: int, rng: random.Random, max_tries: int = 1000) -> tuple[list[int], list[int]]:
    """(puzzle, solution) with exactly `clues` givens and a unique solution."""
    if not 17 <= clues <= 81:
        raise ValueError(f"clues must be in [17, 81], got {clues}")
    for _ in range(max_tries):
        solution = random_grid(rng)
        puzzle = list(solution)
        n = 81
        order = list(range(81))
        rng.shuffle(order)
        for i in order:
            if n == clues:
                break
            d = puzzle[i]
            puzzle[i] = 0
            if solve(puzzle, 1, ban=(i, d)):  # another solution exists: keep the given
                puzzle[i] = d
            else:
                n -= 1
        if n == clues:
            return puzzle, solution
    raise RuntimeError(f"no {clues}-clue puzzle found in {max_tries} tries (too few clues for random removal?)")


def puzzles(n: int, clue_range: tuple[int, int], seed: int) -> Iterator[tuple[list[int], list[int]]]:
    """`n` puzzles with clue counts uniform in [lo, hi], reproducible from `seed`."""
    rng = random.Random(seed)
    for _ in range(n):
        yield make_puzzle(rng.randint(*clue_range), rng)
