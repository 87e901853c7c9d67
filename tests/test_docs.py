"""The docs stay a manual: README.md under 15 KB, and every relative link resolves.

No JAX, no network: plain file reads. Runs as `python -m pytest tests/test_docs.py` or
`python tests/test_docs.py`.
"""

from __future__ import annotations

import glob
import os
import re
import unicodedata
from urllib.parse import unquote

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, 'README.md')
README_LIMIT_BYTES = 15 * 1024

FENCE = re.compile(r'^\s*(```|~~~)')
INLINE_CODE = re.compile(r'`+[^`]*`+')
INLINE_LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
REFERENCE_DEF = re.compile(r'^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+"[^"]*")?\s*$')
HEADING = re.compile(r'^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$')


def doc_files() -> list[str]:
    """README.md, docs/*.md, and the other manual pages that docs link between."""
    paths = [README, *sorted(glob.glob(os.path.join(REPO, 'docs', '*.md')))]
    paths += [p for p in (os.path.join(REPO, 'benchmarks', 'README.md'),
                          os.path.join(REPO, 'CHANGELOG.md')) if os.path.isfile(p)]
    return paths


def prose_lines(path: str) -> list[tuple[int, str]]:
    """(line number, text) outside fenced code blocks, with inline code removed."""
    lines, in_fence = [], False
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            if FENCE.match(line):
                in_fence = not in_fence
                continue
            if not in_fence:
                lines.append((number, INLINE_CODE.sub('', line)))
    return lines


def links(path: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition."""
    found = []
    for number, line in prose_lines(path):
        found += [(number, m.group(1)) for m in INLINE_LINK.finditer(line)]
        if m := REFERENCE_DEF.match(line):
            found.append((number, m.group(1)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link keeps its text
    text = text.replace('`', '').strip().lower()
    kept = ''.join(c for c in text
                   if c in '-_ ' or unicodedata.category(c)[0] in 'LN')
    return kept.replace(' ', '-')


def anchors(path: str) -> set[str]:
    """The heading anchors of a Markdown file, numbered as GitHub numbers repeats."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path):
        if m := HEADING.match(line):
            base = slug(m.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f'{base}-{count}')
    return result


def broken_links(path: str) -> list[str]:
    problems = []
    for number, target in links(path):
        if re.match(r'^[a-z][a-z0-9+.-]*:', target, re.IGNORECASE):  # http:, mailto:, ...
            continue
        file_part, _, fragment = target.partition('#')
        file_part = unquote(file_part)
        resolved = (os.path.normpath(os.path.join(os.path.dirname(path), file_part))
                    if file_part else path)
        where = f'{os.path.relpath(path, REPO)}:{number}: {target}'
        if not os.path.exists(resolved):
            problems.append(f'{where} (no file {os.path.relpath(resolved, REPO)})')
        elif fragment and resolved.endswith('.md') and fragment not in anchors(resolved):
            problems.append(f'{where} (no heading #{fragment} in '
                            f'{os.path.relpath(resolved, REPO)})')
    return problems


def test_readme_stays_under_15_kib():
    size = os.path.getsize(README)
    assert size <= README_LIMIT_BYTES, (
        f'README.md is {size} bytes, over {README_LIMIT_BYTES}: move a topic to docs/ and '
        'link it from the README.')


def test_every_relative_link_in_readme_and_docs_points_to_an_existing_file():
    problems = [p for path in doc_files() for p in broken_links(path)]
    assert not problems, 'Broken links:\n' + '\n'.join(problems)


def test_the_link_checker_sees_links_and_anchors():
    assert slug('The transformer: text → image') == 'the-transformer-text--image'
    assert slug("The paper's sizes and datasets") == 'the-papers-sizes-and-datasets'
    assert slug('`igpt_sample`: the weights') == 'igpt_sample-the-weights'
    line = 'See [a](docs/a.md#x), ![b](b.png "t") and `[c](not-a-link.md)`.'
    assert [m.group(1) for m in INLINE_LINK.finditer(INLINE_CODE.sub('', line))] == [
        'docs/a.md#x', 'b.png']


if __name__ == '__main__':
    test_readme_stays_under_15_kib()
    test_every_relative_link_in_readme_and_docs_points_to_an_existing_file()
    test_the_link_checker_sees_links_and_anchors()
    print('docs ok')
