"""The Sudoku recipe: unique puzzles, the format and tokenizer, augmentation, input validation, the CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dgemma.tasks import sudoku as SU
from dgemma.tasks.sudoku_board import (BoardError, count_solutions, is_solution, make_puzzle, parse, random_grid,
                                       to_string)

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


def reference_count(cells: list[int], limit: int = 2) -> int:
    """An independent, deliberately plain solution counter (recomputes candidates from scratch every node)."""
    grid = list(cells)

    def cands(i):
        r, c = divmod(i, 9)
        used = {grid[r * 9 + k] for k in range(9)} | {grid[k * 9 + c] for k in range(9)}
        br, bc = r // 3 * 3, c // 3 * 3
        used |= {grid[(br + a) * 9 + bc + b] for a in range(3) for b in range(3)}
        return [d for d in range(1, 10) if d not in used]

    def rec():
        empty = [i for i in range(81) if not grid[i]]
        if not empty:
            return 1
        i = min(empty, key=lambda j: len(cands(j)))
        n = 0
        for d in cands(i):
            grid[i] = d
            n += rec()
            grid[i] = 0
            if n >= limit:
                break
        return n

    return min(rec(), limit)


@pytest.mark.parametrize("clues", [36, 32, 30, 27, 24])
def test_generated_puzzles_have_exactly_one_solution(clues):
    rng = random.Random(clues)
    for _ in range(6):
        puzzle, solution = make_puzzle(clues, rng)
        assert sum(1 for v in puzzle if v) == clues
        assert is_solution(puzzle, solution)
        assert reference_count(puzzle) == 1 and count_solutions(puzzle, 5) == 1


def test_solver_counts_agree_with_the_reference():
    rng = random.Random(0)
    for _ in range(10):
        grid = random_grid(rng)
        assert is_solution([0] * 81, grid)
        holes = list(grid)
        for i in rng.sample(range(81), 58):  # 23 clues: often several solutions
            holes[i] = 0
        assert count_solutions(holes, 3) == reference_count(holes, 3)


def test_generation_is_reproducible_and_independent_of_workers():
    a = list(SU.generate(6, (30, 36), seed=3, workers=1, chunk=3))
    b = list(SU.generate(6, (30, 36), seed=3, workers=2, chunk=3))
    assert a == b and len({r["prompt"] for r in a}) == 6
    for r in a:
        assert 30 <= r["clues"] <= 36 and r["prompt"].count(".") == 81 - r["clues"]
        assert reference_count(parse(r["prompt"])) == 1


@pytest.mark.parametrize("text,msg", [
    ("123", "must have 81 cells"),
    ("x" + "." * 80, "invalid character"),
    ("11" + "." * 79, "digit 1 appears twice in row 1"),
    ("1" + "." * 8 + "1" + "." * 71, "digit 1 appears twice in column 1"),
    ("1" + "." * 9 + "1" + "." * 70, "digit 1 appears twice in box 1"),
])
def test_invalid_sudoku_strings(text, msg):
    with pytest.raises(BoardError, match=msg):
        parse(text)


def test_format_tokenizer_and_augmentation():
    tok = SU.tokenizer()
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (0, 1, 2, 16)
    puzzle, solution = make_puzzle(30, random.Random(1))
    p, s = to_string(puzzle), to_string(solution)
    assert tok.encode(p, add_bos=True) == SU.prompt_ids(p) and len(SU.prompt_ids(p)) == 82
    assert tok.decode(tok.encode(s)) == s and SU.board_from_ids(tok.encode(s)) == s
    ds = SU.SudokuDataset([(p, s)], augment=True, seed=0)
    seen = set()
    for epoch in range(5):
        ex = ds.example(0, epoch)
        assert ex.response[-1] == SU.EOS and len(ex.response) == 82
        ap = "".join(SU.ID_CHAR[i] for i in ex.prompt[1:])
        asol = "".join(SU.ID_CHAR[i] for i in ex.response[:-1])
        assert is_solution(parse(ap), [int(c) for c in asol]) and reference_count(parse(ap)) == 1
        assert ap.count(".") == p.count(".")
        seen.add(ap)
    assert len(seen) == 5  # a fresh symmetry every epoch
    assert ds.example(0, 2) == ds.example(0, 2)  # ...reproducibly


# ---------------------------------------------------------------- CLI
def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process on a shared machine
    return subprocess.run([sys.executable, "-m", "dgemma.cli", "sudoku", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=env)


TINY = ["--set", "hidden_size=32", "--set", "num_hidden_layers=2", "--set", "intermediate_size=32",
        "--set", 'layer_types=["sliding_attention","full_attention"]', "--set", "moe_intermediate_size=16",
        "--threads", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("sudoku")
    for name, n, seed in (("train.jsonl", 40, 0), ("test.jsonl", 6, 9)):
        p = cli("gen", "--out", str(d / name), "--n", str(n), "--clues", "30-36", "--seed", str(seed))
        assert p.returncode == 0, p.stderr
    p = cli("train", "--data", str(d / "train.jsonl"), "--eval-data", str(d / "test.jsonl"), "--out", str(d / "run"),
            "--steps", "3", "--batch-size", "4", "--eval-puzzles", "2", "--eval-every", "3", *TINY)
    assert p.returncode == 0, p.stderr
    return d


def test_cli_gen_train_eval(trained):
    recs = [json.loads(x) for x in (trained / "train.jsonl").read_text().splitlines()]
    assert len(recs) == 40 and all(count_solutions(parse(r["prompt"])) == 1 for r in recs)
    log = [json.loads(x) for x in (trained / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and "solve_rate" in log[-1] and "eval_diffusion_loss" in log[-1]
    out = trained / "res.json"
    p = cli("eval", str(trained / "run" / "final"), "--data", str(trained / "test.jsonl"), "--n", "3",
            "--steps", "2", "--json", str(out))
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["results"]
    # checkpoints carry the recipe's restarts; a fixed run has no early stop to miss, so none there
    assert [r["setting"] for r in rows] == ["diffusion N=2 early-stop, 3 restarts", "diffusion N=2 fixed",
                                            "autoregressive (greedy)"]
    assert rows[0]["sampler"]["restarts"] == 3 and "restarts" not in rows[1]["sampler"]
    assert rows[0]["mean_steps"] <= 2 * 4 and 0 <= rows[0]["restarted"] <= 1
    assert rows[1]["mean_steps"] == 2 and 1 <= rows[2]["mean_steps"] <= 81  # AR: one pass per token
    assert all(0 <= r["solve_rate"] <= 1 for r in rows)
    # the sampler is the checkpoint's own (the recipe's warm schedule), and the flags change it
    assert rows[0]["sampler"]["t_min"] == 1.0 and rows[0]["sampler"]["t_max"] == 1.5 and rows[2]["sampler"] is None
    assert rows[1]["sampler"]["confidence_threshold"] == 0.0
    p = cli("eval", str(trained / "run" / "final"), "--data", str(trained / "test.jsonl"), "--n", "2",
            "--steps", "2", "--no-fixed", "--no-ar", "--t-min", "0.3", "--t-max", "0.6", "--entropy-bound", "0.5",
            "--confidence", "0.02", "--stability", "2", "--json", str(out))
    assert p.returncode == 0, p.stderr
    (row,) = json.loads(out.read_text())["results"]
    assert row["sampler"]["t_min"] == 0.3 and row["sampler"]["t_max"] == 0.6
    assert row["sampler"]["confidence_threshold"] == 0.02 and row["sampler"]["stability_threshold"] == 2
    assert row["sampler"]["sampler_config"]["entropy_bound"] == 0.5 and row["sampler"]["max_denoising_steps"] == 2
    p = cli("eval", str(trained / "run" / "final"), "--data", str(trained / "test.jsonl"), "--n", "3",
            "--steps", "2", "--no-fixed", "--constrain", "--json", str(out))
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["setting"] for r in rows] == ["diffusion N=2 early-stop, 3 restarts, constrained",
                                            "autoregressive (greedy), constrained"]
    assert all(r["cell_accuracy"] > 0 for r in rows)  # every cell is one of its candidates, not noise
    p = cli("eval", str(trained / "run" / "final"), "--data", str(trained / "test.jsonl"), "--t-min", "2",
            "--t-max", "1")
    assert p.returncode == 2 and "t_min" in p.stderr and "Traceback" not in p.stderr
    p = cli("eval", str(trained / "run" / "final"), "--data", str(trained / "test.jsonl"),
            "--confidence", "-1")
    assert p.returncode == 2 and "confidence_threshold" in p.stderr and "Traceback" not in p.stderr


def test_allowed_tokens_are_the_candidates_the_givens_leave():
    from dgemma.tasks.sudoku_board import BOX, COL, ROW, solve

    cells = parse("53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79")
    p = "".join(str(c) if c else "." for c in cells)
    allowed = SU.allowed_tokens(p, 96)
    assert sorted(allowed) == list(range(96)) and all(allowed[i] == [SU.EOS] for i in range(81, 96))
    sol = solve(cells, 1)[0]
    for i in range(81):
        assert SU.CELL_IDS[str(sol[i])] in allowed[i]  # the solution is never ruled out
        if cells[i]:
            assert allowed[i] == [SU.CELL_IDS[str(cells[i])]]
        else:
            peers = {cells[j] for j in range(81) if ROW[j] == ROW[i] or COL[j] == COL[i] or BOX[j] == BOX[i]}
            assert len(allowed[i]) == 9 - len(peers - {0})


def test_cli_solve_shows_steps(trained):
    puzzle = json.loads((trained / "test.jsonl").read_text().splitlines()[0])["prompt"]
    p = cli("solve", str(trained / "run" / "final"), puzzle, "--steps", "3")
    assert p.returncode in (0, 1), p.stderr  # an untrained model may well fail to solve it
    assert "step  1" in p.stdout and "step  3" in p.stdout and "denoising steps" in p.stdout or "no board" in p.stdout


@pytest.mark.parametrize("puzzle,msg", [
    ("12345", "must have 81 cells"),
    ("a" * 81, "invalid character"),
    ("55" + "0" * 79, "contradict"),
])
def test_cli_solve_rejects_bad_puzzles(puzzle, msg):
    p = cli("solve", "/no/model", puzzle)
    assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_cli_bad_puzzle_file_and_options(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "' + "." * 81 + '", "response": "' + "1" * 81 + '"}\n')
    p = cli("train", "--data", str(bad), "--out", str(tmp_path / "run"), "--steps", "1")
    assert p.returncode == 2 and "bad.jsonl:1:" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    p = cli("gen", "--out", str(tmp_path / "x.jsonl"), "--clues", "5-90")
    assert p.returncode == 2 and "--clues" in p.stderr


def test_cli_sudoku_resume_and_init_from(trained, tmp_path):
    """A Sudoku run cut after a checkpoint and resumed repeats the same augmented data and the same losses."""
    import shutil

    args = ["train", "--data", str(trained / "train.jsonl"), "--steps", "4", "--batch-size", "4", "--save-every", "2",
            "--log-every", "1", "--keep", "0", *TINY]
    p = cli(*args, "--out", str(tmp_path / "a"))
    assert p.returncode == 0, p.stderr
    want = (tmp_path / "a" / "log.jsonl").read_text()
    # simulate a kill right after the step-2 checkpoint: later checkpoints and the final weights never got written
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000004")
    shutil.rmtree(tmp_path / "b" / "final")
    p = cli("train", "--resume", "--out", str(tmp_path / "b"))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "b" / "log.jsonl").read_text() == want
    # a new schedule from a finished run's weights
    p = cli("train", "--data", str(trained / "train.jsonl"), "--init-from", str(tmp_path / "a" / "final"),
            "--out", str(tmp_path / "c"), "--steps", "1", "--batch-size", "4", "--threads", "1")
    assert p.returncode == 0, p.stderr
    p = cli("train", "--data", str(trained / "train.jsonl"), "--init-from", str(tmp_path / "a" / "final"),
            "--out", str(tmp_path / "d"), "--steps", "1", *TINY)
    assert p.returncode == 2 and "cannot be used with --init-from" in p.stderr
