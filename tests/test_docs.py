"""The documentation: a short README with the two commands, no machine-local paths, links that resolve, and a
configuration page that documents every field of the ``data_free`` block with its default."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from lrwa_plugin.config import DataFreeConfig

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
CONFIGURATION = ROOT / 'docs' / 'configuration.md'
README_MAX_LINES = 250
#: What a user's clone does not have, or what names this machine rather than the repository.
FORBIDDEN = ('../shared', 'fresh-ci', '/work/', '/tmp/')
#: The data_free counts and their defaults, documented whether or not the dataclass carries them as defaults.
COUNT_DEFAULTS = {'iterations_per_epoch': 50, 'batch_size': 256, 'student_steps': 5}

FENCE = re.compile(r'^(```|~~~).*?^\1[ \t]*$', re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r'`[^`\n]*`')
LINK = re.compile(r'!?\[[^\]\n]*\]\(([^)\s]+)\)')
HEADING = re.compile(r'^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$', re.MULTILINE)


def markdown_files() -> list[Path]:
    files = [README, ROOT / 'CONTRIBUTING.md', *sorted((ROOT / 'docs').glob('*.md')),
             *sorted((ROOT / 'examples').rglob('README.md'))]
    return [path for path in files if path.is_file()]


def prose(text: str) -> str:
    """The text less fenced code blocks (where ``# comment`` is not a heading and ``[x](y)`` is not a link)."""
    return FENCE.sub('', text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (``_`` and ``-`` kept), spaces to hyphens."""
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link in a heading anchors by its text
    return re.sub(r'[^\w\- ]', '', text.replace('`', '').strip().lower()).replace(' ', '-')


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for match in HEADING.finditer(prose(path.read_text(encoding='utf-8'))):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f'{base}-{count}')
    return result


def relative_links(path: Path) -> list[str]:
    text = INLINE_CODE.sub('', prose(path.read_text(encoding='utf-8')))
    return [target for target in LINK.findall(text)
            if not re.match(r'^[a-z][a-z0-9+.-]*:', target, re.IGNORECASE) and not target.startswith('#')]


def same_page_anchors(path: Path) -> list[str]:
    text = INLINE_CODE.sub('', prose(path.read_text(encoding='utf-8')))
    return [target[1:] for target in LINK.findall(text) if target.startswith('#')]


def test_the_documentation_files_exist():
    names = {path.relative_to(ROOT).as_posix() for path in markdown_files()}
    for page in ('README.md', 'CONTRIBUTING.md', 'docs/configuration.md', 'docs/extending.md', 'docs/method.md',
                 'docs/datasets_and_paper_scale.md', 'docs/performance.md', 'docs/processes_and_resume.md',
                 'docs/troubleshooting.md'):
        assert page in names, f'{page} is missing'


def test_readme_is_short_and_has_both_commands():
    text = README.read_text(encoding='utf-8')
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f'README.md has {len(lines)} lines; at most {README_MAX_LINES}'
    assert 'python examples/run_torchdistill.py' in text
    assert 'python -m pytest' in text
    assert lines[0].startswith('# '), 'README.md opens with its title'
    headings = [match.group(2).lower() for match in HEADING.finditer(prose(text))]
    assert not any('changelog' in heading or 'release notes' in heading for heading in headings)


@pytest.mark.parametrize('path', markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_machine_local_paths(path):
    text = path.read_text(encoding='utf-8')
    for needle in FORBIDDEN:
        for number, line in enumerate(text.splitlines(), 1):
            assert needle not in line, f'{path.relative_to(ROOT)}:{number} names {needle!r}: {line.strip()}'


@pytest.mark.parametrize('path', markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    for target in relative_links(path):
        file_part, _, anchor = target.partition('#')
        linked = (path.parent / file_part).resolve()
        assert linked.exists(), f'{path.relative_to(ROOT)} links to {target}, which does not exist'
        assert linked == ROOT or ROOT in linked.parents, f'{path.relative_to(ROOT)} links outside the repository'
        if anchor and linked.suffix == '.md':
            assert anchor in anchors(linked), f'{path.relative_to(ROOT)} links to {target}: no such heading'
    for anchor in same_page_anchors(path):
        assert anchor in anchors(path), f'{path.relative_to(ROOT)} links to #{anchor}: no such heading'


@pytest.mark.parametrize('path', sorted((ROOT / 'docs').glob('*.md')), ids=lambda p: p.name)
def test_docs_pages_open_with_a_purpose(path):
    lines = path.read_text(encoding='utf-8').splitlines()
    assert lines[0].startswith('# '), f'{path.name} opens with its title'
    purpose = next((line for line in lines[1:] if line.strip()), '')
    assert purpose and not purpose.startswith(('#', '|', '-', '```')), f'{path.name}: a one-line purpose follows'
    if len(lines) > 80:
        head = '\n'.join(lines[:30])
        assert len(re.findall(r'\]\(#', head)) >= 3, f'{path.name} has {len(lines)} lines: a table of contents'


def rendered(value: object) -> set[str]:
    """How a default may be written in the table's default column."""
    if value is None:
        return {'none'}
    if isinstance(value, bool):
        return {str(value).lower()}
    if isinstance(value, str):
        return {value, f"'{value}'", f'`{value}`', f"`'{value}'`"}
    return {str(value), repr(value), f'{value:g}'}


def documented_rows(text: str) -> dict[str, set[str]]:
    """``| `key` | default | meaning |`` rows: key -> the default columns of every row for it (a key such as
    ``batch_size`` has a row in more than one table)."""
    rows: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.match(r'^\| `([^`]+)` \| ([^|]+?) \|', line)
        if match:
            rows.setdefault(match.group(1), set()).add(match.group(2))
    return rows


def test_configuration_documents_every_data_free_field_with_its_default():
    rows = documented_rows(CONFIGURATION.read_text(encoding='utf-8'))
    missing = []
    for field in dataclasses.fields(DataFreeConfig):
        default = field.default
        if default is dataclasses.MISSING or not isinstance(default, (int, float, str, type(None))):
            continue  # required, or built by a default_factory: no plain value to document
        if not rows.get(field.name, set()) & rendered(default):
            missing.append(f'| `{field.name}` | {sorted(rendered(default))[0]} |')
    assert not missing, f'docs/configuration.md lacks the rows (or has another default): {missing}'


def test_configuration_documents_the_counts():
    rows = documented_rows(CONFIGURATION.read_text(encoding='utf-8'))
    for name, default in COUNT_DEFAULTS.items():
        assert str(default) in rows.get(name, set()), f'docs/configuration.md: expected a row | `{name}` | {default} |'
    for field in dataclasses.fields(DataFreeConfig):
        if field.name in COUNT_DEFAULTS and field.default is not dataclasses.MISSING:
            assert field.default == COUNT_DEFAULTS[field.name], f'{field.name}: the docs say {COUNT_DEFAULTS}'
