#!/usr/bin/env python
"""Write the held-out table of a ``uad benchmark`` run into the model cards and the README.

    python scripts/update_cards.py BENCH_DIR [BENCH_DIR ...] [--models models/] [--readme README.md] [--print]
    python scripts/update_cards.py @docs/benchmark/heldout-runs.txt --models models/ --readme README.md

BENCH_DIR is a ``uad benchmark -o BENCH_DIR`` folder (its ``benchmark.json``).  Every model of
``--models``'s manifest that the run measured gets its card's section between
``<!-- heldout-table:begin -->`` and ``<!-- heldout-table:end -->`` replaced (appended under
"## Held-out benchmark" when the card has none) with the rows of the methods it serves;
text outside the markers is left as it is.  ``--readme`` replaces the same marked section of
the README with the table of every measured model (the README must have the markers).
``--models`` also writes each measured model's ``evaluation.heldout`` into the manifest (its default
presets' AP per lesion type, the floor, the volume counts and the run), which ``uad detect`` reads to
pick the best method per contrast (``uad.selection``); ``--no-manifest`` leaves the manifest alone.
Rows measured with other weights than a model ships now (their recorded ``model_sha256`` differs from the
manifest's: the model was retrained and re-bundled) are left out of cards, README and manifest.
``--print`` prints the README table.  ``@FILE`` reads arguments from FILE, one per line:
``docs/benchmark/heldout-runs.txt`` lists, in order, the runs the README's and the cards' tables are written
from (a new run is appended there, then the command above is run; ``Testing/test_benchmark.py`` checks that the
committed tables are what it writes).  See ``uad.heldout_table``.

    python scripts/update_cards.py --presets-report DIR [--models models/] [--readme README.md] [--print]

writes the paired paper-against-default comparison of ``uad benchmark --compare-presets -o DIR`` (its
``presets.json``) between ``<!-- preset-table:begin -->`` and ``<!-- preset-table:end -->``: into the card of
every model serving a compared method (appended under "## Paper preset against the default preset" when the
card has none) and into the README's marked section (``uad.benchmark.update_preset_cards``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO / "UADExtension"))

from uad import UADError  # noqa: E402
from uad.heldout_table import (block, current_weights, load_report, manifest_entries, restamp_defaults,  # noqa: E402
                               update_cards, update_file, update_manifest)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], fromfile_prefix_chars="@")
    p.add_argument("bench_dir", nargs="*",
                   help="'uad benchmark -o DIR' folder(s), or their benchmark.json; with several, a model's rows "
                        "come from the last run that measured it (each against its own run's floor)")
    p.add_argument("--models", default=None, metavar="DIR",
                   help="model folder with manifest.json whose cards are updated (e.g. models/)")
    p.add_argument("--no-manifest", action="store_true",
                   help="with --models: do not write evaluation.heldout into the manifest")
    p.add_argument("--readme", default=None, metavar="FILE", help="README whose marked section is replaced")
    p.add_argument("--command", default=None,
                   help="the benchmark's command line, for reports written before benchmark.json recorded it")
    p.add_argument("--print", action="store_true", dest="show", help="print the README table")
    p.add_argument("--as-recorded", action="store_true",
                   help="mark default presets as the runs recorded them (default: the methods' default presets "
                        "today, so rows of a former default are not judged as the default)")
    p.add_argument("--presets-report", default=None, metavar="DIR",
                   help="'uad benchmark --compare-presets -o DIR' folder (or its presets.json): write the preset "
                        "section instead of the held-out table")
    a = p.parse_args(argv)
    if a.presets_report:
        return _presets(a)
    if not a.bench_dir:
        p.error("give BENCH_DIR(s) or --presets-report DIR")
    try:
        reps = [load_report(d) for d in a.bench_dir]
        for rep in reps:
            if a.command and not rep.get("command"):
                rep["command"] = a.command
            if not a.as_recorded:
                restamp_defaults(rep)
        rep = reps[0] if len(reps) == 1 else reps
        entries = manifest_entries(a.models) if a.models else None
        if entries is not None:  # rows of weights a model no longer ships are left out everywhere
            rep, dropped = current_weights(rep, entries)
            for mid, i, method, preset in sorted(set(dropped), key=str):
                print(f"{mid}: {method}/{preset} of run {i} measured other weights (or another normalisation) than "
                      f"the bundled model: left out")
        # the manifest's measurements first: they decide which model is a method's default, which the tables say
        # (written after them, the first run following a new model's benchmark named the old model the default)
        if a.models and not a.no_manifest:
            for mid, what in update_manifest(rep, a.models):
                print(f"{mid}: {what}")
        # the README lists the models that are bundled now, not those a run measured then
        ids = {e.get("id") for e in entries} if entries is not None else None
        text = block(rep, ids)
        if a.show or not (a.models or a.readme):
            print(text)
        if a.models:
            for mid, what in update_cards(rep, a.models):
                print(f"{mid}: {what}")
        if a.readme:
            changed = update_file(a.readme, text, heading=None, require_markers=True)
            print(f"{a.readme}: {'updated' if changed else 'unchanged (same table)'}")
    except (ValueError, OSError, UADError) as e:
        print(f"update_cards: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


def _presets(a) -> int:
    from uad.benchmark import load_presets_report, presets_block, update_preset_cards

    try:
        rep = load_presets_report(a.presets_report)
        if a.show or not (a.models or a.readme):
            print(presets_block(rep))
        if a.models or a.readme:
            if not a.models:
                raise ValueError("--presets-report with --readme needs --models too")
            for mid, what in update_preset_cards(rep, a.models, a.readme):
                print(f"{mid}: {what}")
    except (ValueError, OSError) as e:
        print(f"update_cards: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
