"""A drift map: the same arms compared, paired by seed, at several levels of generator drift
(``examples/drift_map.py``).

One comparison (:mod:`lrwa_plugin.run.compare`) answers a question at one setting; a map asks how the answer moves
along an axis. The map is a YAML spec: per dataset, the levels of the axis (each a folder of configs, one per arm),
the arms, the comparisons (each arm against another at the same level), the teachers every run distils from (with
their SHA-256) and the knobs that define a level (dotted paths read from the baseline arm's config)::

    out: examples/results/drift_map
    seeds: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    baseline: mb_dfkd
    arms: [mb_dfkd, dfad, lrwa_mb]
    comparisons:
      - {arm: dfad, against: mb_dfkd}
      - {arm: lrwa_mb, against: mb_dfkd}
    axis: {arm: dfad, against: mb_dfkd}        # forgetting must grow along the levels
    knobs: {generator_lr: train.data_free.generator.optimizer.kwargs.lr}
    teachers:
      digits: {file: examples/results/drift_map/teachers/digits_teacher.pt, at: resource/ckpt/digits/teacher.pt,
               sha256: 1f2c27f7...}
    datasets:
      digits:
        - {level: 1, configs: examples/configs/digits/drift, files: {lrwa_mb: lrwa_mb_lr1}}
        - {level: 2, configs: examples/configs/digits/drift_strong}
    second_stage:                              # optional: more seeds for some arms at some levels, in this order
      {seeds: [10, 11, 12, 13], arms: [mb_dfkd, lrwa_mb], levels: [digits_L2, digits_L1]}

``run`` runs the grid through compare, level by level and seed-major (``chunk`` seeds at a time, so that a stopped map
leaves whole seeds; finished runs are re-read and stopped ones resume), into ``OUT/<dataset>_L<level>/``; ``run
--stage 2`` runs the second stage's seeds of its arms and levels (their tables: ``stage2.*`` in the level's folder).
``analyse`` reads every finished run and writes the map's tables and figure (:mod:`lrwa_plugin.run.drift_map_report`).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config.checks import check_keys, choice, count, mapping, require
from ..errors import ConfigError, WriteError
from ..util import atomic_write, listed, show
from . import compare as compare_module
from .drift_map_report import analyse, map_markdown, write_map

SPEC_KEYS = ('out', 'seeds', 'baseline', 'arms', 'comparisons', 'axis', 'knobs', 'teachers', 'datasets',
             'second_stage')
REQUIRED_KEYS = SPEC_KEYS[:-1]
LEVEL_KEYS = ('level', 'configs', 'files')


@dataclass(frozen=True)
class Level:
    """One level of one dataset's axis: a config per arm."""

    dataset: str
    level: int
    configs: Mapping[str, Path]

    @property
    def folder(self) -> str:
        return f'{self.dataset}_L{self.level}'


@dataclass(frozen=True)
class Comparison:
    """One arm against another at the same level, paired by seed (``arm`` minus ``against``)."""

    arm: str
    against: str

    @property
    def label(self) -> str:
        return f'{self.arm} vs {self.against}'


@dataclass(frozen=True)
class Teacher:
    """A committed teacher (``file``, its ``sha256``) and where a dataset's configs read it (``at``)."""

    dataset: str
    file: Path
    at: Path
    sha256: str


@dataclass(frozen=True)
class Stage:
    """More seeds for some arms at some levels (folders such as ``digits_L2``, run in this order)."""

    seeds: tuple[int, ...]
    arms: tuple[str, ...]
    levels: tuple[str, ...]


@dataclass(frozen=True)
class MapSpec:
    """A map spec as read by :func:`load_spec`."""

    out: Path
    seeds: tuple[int, ...]
    baseline: str
    arms: tuple[str, ...]
    comparisons: tuple[Comparison, ...]
    axis: Comparison
    knobs: Mapping[str, str]
    teachers: tuple[Teacher, ...]
    levels: tuple[Level, ...]
    second_stage: Stage | None = None

    def seeds_of(self, level: Level, arm: str) -> tuple[int, ...]:
        """The seeds an arm runs at a level: every arm the spec's, and the second stage's where it applies."""
        stage = self.second_stage
        more = stage.seeds if stage and arm in stage.arms and level.folder in stage.levels else ()
        return (*self.seeds, *more)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _comparison(block: Any, path: str, arms: Sequence[str]) -> Comparison:
    block = mapping(block, path)
    check_keys(block, ('arm', 'against'), path)
    arm = choice(require(block, 'arm', path, 'an arm'), arms, f'{path}.arm', 'arm', 'the arms are')
    against = choice(require(block, 'against', path, 'an arm'), arms, f'{path}.against', 'arm', 'the arms are')
    if arm == against:
        raise ConfigError(path, f"compares '{arm}' with itself")
    return Comparison(arm, against)


def load_spec(path: str | Path) -> MapSpec:
    """Reads and checks a map spec (paths relative to the current directory); anything wrong is one ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError('--spec', f"file '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding='utf-8'))
    except yaml.YAMLError as error:
        raise ConfigError('--spec', f"'{path}' is not valid YAML: {str(error).splitlines()[0]}") from error
    spec = mapping(raw, 'spec')
    check_keys(spec, SPEC_KEYS, 'spec')
    for key in REQUIRED_KEYS:
        require(spec, key, 'spec', 'see docs/drift_map.md')
    seeds = _seeds(spec['seeds'], 'spec.seeds')
    arms = spec['arms']
    if not isinstance(arms, list) or not arms or not all(isinstance(a, str) for a in arms) \
            or len(set(arms)) != len(arms):
        raise ConfigError('spec.arms', f'expected a list of distinct arm names, got {show(arms)}')
    baseline = choice(spec['baseline'], arms, 'spec.baseline', 'arm', 'the arms are')
    if not isinstance(spec['comparisons'], list) or not spec['comparisons']:
        raise ConfigError('spec.comparisons', f'expected a list of {{arm, against}}, got {show(spec["comparisons"])}')
    comparisons = tuple(_comparison(c, f'spec.comparisons[{i}]', arms) for i, c in enumerate(spec['comparisons']))
    axis = _comparison(spec['axis'], 'spec.axis', arms)
    if axis not in comparisons:
        raise ConfigError('spec.axis', f"'{axis.label}' is not one of spec.comparisons")
    knobs = mapping(spec['knobs'], 'spec.knobs')
    if not all(isinstance(v, str) and v for v in knobs.values()):
        raise ConfigError('spec.knobs', 'expected a mapping of names to dotted config paths')
    teachers = []
    for dataset, block in mapping(spec['teachers'], 'spec.teachers').items():
        where = f'spec.teachers.{dataset}'
        block = mapping(block, where)
        check_keys(block, ('file', 'at', 'sha256'), where)
        file = Path(require(block, 'file', where, 'the committed teacher'))
        if not file.is_file():
            raise ConfigError(f'{where}.file', f"file '{file}' does not exist")
        teachers.append(Teacher(dataset, file, Path(require(block, 'at', where, "the configs' src_ckpt")),
                                str(require(block, 'sha256', where, "the teacher's SHA-256"))))
    levels = []
    for dataset, entries in mapping(spec['datasets'], 'spec.datasets').items():
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f'spec.datasets.{dataset}', f'expected a list of levels, got {show(entries)}')
        seen = set()
        for i, entry in enumerate(entries):
            where = f'spec.datasets.{dataset}[{i}]'
            entry = mapping(entry, where)
            check_keys(entry, LEVEL_KEYS, where)
            level = count(require(entry, 'level', where, 'its index on the axis'), f'{where}.level', minimum=0)
            if level in seen:
                raise ConfigError(f'{where}.level', f'level {level} is given twice')
            seen.add(level)
            folder = Path(require(entry, 'configs', where, 'a folder of configs, one per arm'))
            files = mapping(entry.get('files') or {}, f'{where}.files')
            for arm in files:
                choice(arm, arms, f'{where}.files.{arm}', 'arm', 'the arms are')
            configs = {arm: folder / f'{files.get(arm, arm)}.yaml' for arm in arms}
            missing = [str(p) for p in configs.values() if not p.is_file()]
            if missing:
                raise ConfigError(f'{where}.configs', f'no such config: {listed(missing)}')
            stems = [p.stem for p in configs.values()]
            if len(set(stems)) != len(stems):
                raise ConfigError(f'{where}.files', 'two arms share a config file name (compare labels runs by it)')
            levels.append(Level(dataset, level, configs))
    stage = None
    if spec.get('second_stage') is not None:
        block = mapping(spec['second_stage'], 'spec.second_stage')
        check_keys(block, ('seeds', 'arms', 'levels'), 'spec.second_stage')
        more = _seeds(require(block, 'seeds', 'spec.second_stage', 'seeds beyond spec.seeds'),
                      'spec.second_stage.seeds')
        if set(more) & set(seeds):
            again = listed(sorted(set(more) & set(seeds)))
            raise ConfigError('spec.second_stage.seeds', f'{again} already in spec.seeds')
        stage_arms = require(block, 'arms', 'spec.second_stage', 'the arms that run them')
        if not isinstance(stage_arms, list) or baseline not in stage_arms:
            raise ConfigError('spec.second_stage.arms', f"expected a list of arms holding the baseline '{baseline}'")
        for i, arm in enumerate(stage_arms):
            choice(arm, arms, f'spec.second_stage.arms[{i}]', 'arm', 'the arms are')
        folders = [lv.folder for lv in levels]
        stage_levels = require(block, 'levels', 'spec.second_stage', 'level folders such as digits_L2')
        if not isinstance(stage_levels, list) or not stage_levels:
            raise ConfigError('spec.second_stage.levels', f'expected a list of level folders, got {show(stage_levels)}')
        for i, folder in enumerate(stage_levels):
            choice(folder, folders, f'spec.second_stage.levels[{i}]', 'level', 'the levels are')
        stage = Stage(more, tuple(stage_arms), tuple(stage_levels))
    return MapSpec(Path(spec['out']), seeds, baseline, tuple(arms), comparisons, axis, dict(knobs),
                   tuple(teachers), tuple(sorted(levels, key=lambda lv: (lv.dataset, lv.level))), stage)


def _seeds(value: Any, path: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or len(set(map(str, value))) != len(value):
        raise ConfigError(path, f'expected a list of distinct seeds, got {show(value)}')
    return tuple(count(s, f'{path}[{i}]', minimum=0) for i, s in enumerate(value))


# ---------------------------------------------------------------------------------------------------- running
def install_teachers(spec: MapSpec) -> list[str]:
    """Puts each committed teacher where the configs read it; checks every digest before copying any, and never
    replaces a different file there. Returns one line per teacher."""
    lines = []
    for teacher in spec.teachers:
        where = f'spec.teachers.{teacher.dataset}'
        if sha256_of(teacher.file) != teacher.sha256:
            raise ConfigError(f'{where}.file', f"'{teacher.file}' is not the teacher of sha256 {teacher.sha256}")
        if teacher.at.exists() and sha256_of(teacher.at) != teacher.sha256:
            raise ConfigError(f'{where}.at', f"'{teacher.at}' holds another teacher than the map's; move it away "
                                             '(the runs must all distil from one teacher)')
    for teacher in spec.teachers:
        if teacher.at.exists():
            lines.append(f'{teacher.dataset} teacher: {teacher.at} (sha256 checked)')
            continue
        with open(teacher.file, 'rb') as source:
            atomic_write(teacher.at, lambda target, source=source: shutil.copyfileobj(source, target))
        lines.append(f'{teacher.dataset} teacher: copied {teacher.file} to {teacher.at}')
    return lines


def select(spec: MapSpec, datasets: Sequence[str] | None, levels: Sequence[int] | None) -> list[Level]:
    known = sorted({lv.dataset for lv in spec.levels})
    for dataset in datasets or ():
        choice(dataset, known, '--datasets', 'dataset', 'the spec has')
    chosen = [lv for lv in spec.levels if (not datasets or lv.dataset in datasets)
              and (levels is None or lv.level in levels)]
    if not chosen:
        raise ConfigError('--levels', f'no level of the spec is {listed(levels or [])}')
    return chosen


def run_map(spec: MapSpec, levels: Sequence[Level], seeds: Sequence[int], chunk: int, jobs: int,
            arms: Sequence[str] | None = None, name: str = 'summary') -> int:
    """Runs each level's ``arms`` (all by default) over ``seeds``, ``chunk`` seeds at a time (one thread per run,
    ``jobs`` at once; compare's tables named ``name``); a chunk whose runs failed is run once more. Returns 0, or
    compare's exit status where it stopped."""
    arms = [spec.baseline, *[a for a in (arms or spec.arms) if a != spec.baseline]]
    for level in levels:
        for end in range(chunk, len(seeds) + chunk, chunk):
            argv = ['--configs', *(str(level.configs[a]) for a in arms), '--seeds', *map(str, seeds[:end]),
                    '--baseline', str(level.configs[spec.baseline]), '--out', str(spec.out / level.folder),
                    '--threads', '1', '--jobs', str(jobs), '--name', name]
            status = compare_module.main(argv)
            if status == 1:  # a run failed: once more with the same seed (docs/drift_map.md), then on
                status = compare_module.main(argv)
            print(f'{level.folder}: seeds {seeds[0]}-{seeds[min(end, len(seeds)) - 1]}: exit {status}', flush=True)
            if status not in (0, 1):
                return status
    return 0


# ---------------------------------------------------------------------------------------------------- command line
def get_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Runs or analyses a drift map (docs/drift_map.md).')
    parser.add_argument('--spec', default='examples/drift_map.yaml', help='the map spec (YAML)')
    commands = parser.add_subparsers(dest='command', required=True)
    run = commands.add_parser('run', help="run the map's grid through compare (finished runs are re-read)")
    run.add_argument('--datasets', nargs='+', help='only these datasets of the spec')
    run.add_argument('--levels', nargs='+', type=int, help='only these levels')
    run.add_argument('--seeds', nargs='+', type=int, help="the spec's seeds by default")
    run.add_argument('--chunk', type=int, default=2, help='seeds per compare call (seed-major order); default 2')
    run.add_argument('--jobs', type=int, default=2, help='runs at once, one CPU thread each; default 2')
    run.add_argument('--stage', type=int, choices=(1, 2), default=1,
                     help="1: every arm at every level over the spec's seeds; 2: the second stage")
    analyse_parser = commands.add_parser('analyse', help='write OUT/map.{json,md,png} from the finished runs')
    analyse_parser.add_argument('--stage', type=int, choices=(1, 2), default=2,
                                help="1: the spec's seeds only (OUT/map_stage1.*); 2 (default): every finished run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit status 2 for a spec or argument that cannot work, 4 for a file that could not be written,
    else what the runs gave (compare's statuses) or 0."""
    args = get_argparser().parse_args(argv)
    try:
        spec = load_spec(args.spec)
        if args.command == 'analyse':
            if args.stage == 1:
                spec = dataclasses.replace(spec, second_stage=None)
            result = analyse(spec)
            paths = write_map(spec, result, 'map' if args.stage == 2 else 'map_stage1')
            print(map_markdown(spec, result))
            print('wrote ' + ', '.join(map(str, paths)))
            return 0
        count(args.chunk, '--chunk')
        count(args.jobs, '--jobs')
        stage = spec.second_stage
        if args.stage == 2 and stage is None:
            raise ConfigError('--stage', 'the spec has no second_stage')
        planned = spec.seeds if args.stage == 1 else stage.seeds
        seeds = tuple(args.seeds) if args.seeds else planned
        unknown = [s for s in seeds if s not in planned]
        if unknown:
            raise ConfigError('--seeds', f"{listed(unknown)} not in the stage's seeds (add them to the spec first)")
        levels = select(spec, args.datasets, args.levels)
        if args.stage == 2:
            by_folder = {lv.folder: lv for lv in levels}
            levels = [by_folder[folder] for folder in stage.levels if folder in by_folder]
        for line in install_teachers(spec):
            print(line)
        return run_map(spec, levels, seeds, args.chunk, args.jobs, *((stage.arms, 'stage2') if args.stage == 2
                                                                       else ()))
    except (ConfigError, WriteError) as error:
        print(f'error: {error}', file=sys.stderr)
        return error.exit_status


if __name__ == '__main__':
    sys.exit(main())
