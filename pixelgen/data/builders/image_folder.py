"""`image_folder:<path>`: a user's own folder of images, built offline by tfds (array_record).

Layout (everything optional except the images):
  <path>/[train/ and test/]/[<class>/...]/*.jpg|png|...   images, at any depth below a class
  <path>/captions.csv | captions.jsonl | metadata.csv | metadata.jsonl   file name -> caption

- Class subfolders become `label` (names sorted); without subfolders there is no label.
- `train/` and `test/` subfolders are the splits; otherwise a held-out `test` split takes
  TEST_FRACTION of the images (at least one), chosen by a hash of their names.
- A caption row names its image by its path relative to the folder or, when unique, by its
  bare file name, with or without the extension. CSV needs columns (file_name, caption) or a
  header naming them (file_name|file|filename|image|path, caption|text); JSONL lines are
  objects with the same keys. Caption paths are only matched against the files found in the
  folder, never opened, so `../` in a captions file cannot reach outside it.

Bad data never stops a build. Every file is converted or skipped, and counted:
  converted: RGBA/LA/transparent palette (composited on white), palette, CMYK, 16-bit,
             grayscale and other modes -> 8-bit RGB; EXIF rotation applied;
  resized:   longer side above MAX_SIDE -> MAX_SIDE (aspect kept; never upscaled);
  skipped:   corrupt or truncated files, non-images, anything but a regular file (FIFOs,
             sockets, devices: never opened, so a pipe cannot hang the build), sides below
             MIN_SIDE, more than
             MAX_PIXELS pixels (decompression bombs: refused from the header, never decoded),
             a second file of the same name (`a.jpg` beside `a.png`: a captioned one is kept),
             images outside the class folders, links that lead outside the folder;
  captions:  empty, over-long (cut at a word), non-UTF-8 (read as cp1252), malformed rows,
             duplicates, ambiguous names, unsafe paths, captions without an image, captions
             whose image was skipped and images without a caption.
  kept:      an RGB JPEG that needs none of the above keeps its own bytes (`kept_jpeg_bytes`);
             every other image is stored as the PNG of its converted pixels.
The build prints a summary of the counts at the end and records it in the dataset's
`metadata.json` (`builder.info.metadata['summary']`).

Decoding and converting run in `num_workers` processes (`python -m pixelgen.prepare
--num_workers N`; 0, the first-use build's default, is this process), FILES_PER_UNIT files at
a time, each unit's result saved under `<data_dir>/.pixelgen-work/`: a killed build, run
again, converts only the units it had not finished (pixelgen/data/builders/work_units.py).
"""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import os
import posixpath
import re
import stat
import warnings
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from pixelgen import storage
from pixelgen.data.builders import work_units
from pixelgen.data.builders.shapes import png_bytes
from pixelgen.data.decode import DataError

IMAGE_FOLDER_PREFIX = 'image_folder:'  # config.data.dataset = 'image_folder:/path/to/images'

CAPTION_FILES = ('captions.csv', 'captions.jsonl', 'metadata.csv', 'metadata.jsonl')
FILE_KEYS = ('file_name', 'file', 'filename', 'image', 'path')
CAPTION_KEYS = ('caption', 'text')
SPLIT_DIRS = ('train', 'test')
EXAMPLES_PER_REASON = 5  # file names kept per count in the summary, to find the culprits
ORIENTATION_TAG = 0x0112  # EXIF: how the stored pixels are rotated
FILES_PER_UNIT = 64  # files a build converts per unit of work (what a killed build redoes)


def folder_of(dataset: str) -> str:
    """The absolute folder named by 'image_folder:<path>'; DataError if it is not one."""
    path = dataset[len(IMAGE_FOLDER_PREFIX):]
    if storage.is_remote(path):  # its builder's name comes from the folder's real path
        raise DataError(f'config.data.dataset={dataset!r}: image_folder reads a local folder. '
                        f'Copy it to this machine first (gcloud storage cp -r {path} DIR) and '
                        "pass --config.data.dataset='image_folder:DIR'; the data dir "
                        '(--config.data.data_dir) may be on gs://.')
    folder = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(folder):
        raise DataError(f'config.data.dataset={dataset!r}: {folder} is not a directory. Pass '
                        "--config.data.dataset='image_folder:/path/to/your/images'.")
    return folder


def config_name(folder: str) -> str:
    """A tfds config name per folder and contents: readable, and unique through a hash of the
    real path and of every file's name, size and modification time (`contents_digest`). A
    folder that changed is a new config, built afresh, never the old build reused."""
    slug = re.sub(r'[^A-Za-z0-9_]+', '_', os.path.basename(folder))[:40] or 'root'
    identity = os.path.realpath(folder) + '\n' + contents_digest(folder)
    digest = hashlib.sha1(identity.encode()).hexdigest()[:10]
    return f'{slug}-{digest}'


def contents_digest(folder: str) -> str:
    """A hash of the relative path, size and modification time of every file below `folder`
    (hidden entries aside, links followed), read from the file system's metadata only."""
    h = hashlib.sha1()
    for rel in _walk(folder):
        try:
            st = os.stat(os.path.join(folder, rel))
            h.update(f'{rel}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
        except OSError:  # a broken link or a file that vanished: its name still counts
            h.update(f'{rel}\0-\n'.encode())
    return h.hexdigest()


class Report:
    """Counts by reason, and the first few file names behind each count."""

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, reason: str, name: str = '') -> None:
        self.counts[reason] += 1
        if name and len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(name)

    def to_json(self) -> dict[str, Any]:
        return {'counts': dict(sorted(self.counts.items())), 'examples': dict(self.examples)}


class Skip(Exception):
    """This file is left out of the dataset, for the reason given."""


def _image_extensions() -> set[str]:
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited onto white (not dropped, which
    would reveal whatever colour the transparent pixels happen to hold); 16-bit is scaled."""
    if image.mode == 'RGB':
        return image
    if image.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):  # 16-bit grayscale
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.round(np.clip(values, 0, 65535) / 257).astype(np.uint8)
                               ).convert('RGB')
    if 'A' in image.mode or 'a' in image.mode or 'transparency' in image.info:
        rgba = image.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert('RGB')
    return image.convert('RGB')


def load_rgb(path: str, *, max_side: int, min_side: int, max_pixels: int
             ) -> tuple[np.ndarray, str, bool, bool]:
    """(uint8 [h, w, 3], the file's original mode, whether it was shrunk, whether the file's
    own bytes hold exactly these pixels: an RGB JPEG, unrotated and not shrunk); Skip if
    unusable."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # we check ourselves
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as e:
            raise Skip('too_many_pixels') from e
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise Skip('too_many_pixels')  # decided from the header: nothing is decoded
        if min(width, height) < min_side:
            raise Skip('too_small')
        mode, fmt = image.mode, image.format
        unrotated = image.getexif().get(ORIENTATION_TAG, 1) == 1
        image.draft('RGB', (max_side, max_side))  # JPEG: decode huge photos at a lower scale
        image.load()  # truncated or damaged data fails here
        drafted = image.size != (width, height)
        image = to_rgb(ImageOps.exif_transpose(image))
    resized = max(image.size) > max_side
    if resized:
        image.thumbnail((max_side, max_side), Image.Resampling.BOX)
    as_is = fmt == 'JPEG' and mode == 'RGB' and unrotated and not (drafted or resized)
    return np.asarray(image), mode, resized or drafted, as_is


def convert_files(folder: str, relpaths: tuple[str, ...], max_side: int, min_side: int,
                  max_pixels: int) -> list[tuple[str, tuple]]:
    """One unit of a folder's build (in a worker process): (relpath, outcome) of each file,
    where outcome is ('ok', image bytes, original mode, resized, kept as is) or ('skip',
    reason). An RGB JPEG that needs no change keeps its own bytes (no second lossy encoding);
    any other image is stored as the PNG of its converted pixels."""
    results = []
    for relpath in relpaths:
        path = os.path.join(folder, relpath)
        try:
            pixels, mode, resized, as_is = load_rgb(path, max_side=max_side,
                                                    min_side=min_side, max_pixels=max_pixels)
        except Skip as e:
            results.append((relpath, ('skip', str(e))))
            continue
        except Exception:  # noqa: BLE001 - an image's name but not its contents (unidentified,
            results.append((relpath, ('skip', 'corrupt')))  # truncated, ...): skip, never crash
            continue
        if as_is:
            with open(path, 'rb') as f:
                data = f.read()
        else:
            data = png_bytes(pixels)
        results.append((relpath, ('ok', data, mode, resized, as_is)))
    return results


# Captions -------------------------------------------------------------------------------

def _decode_lines(raw: bytes, report: Report, name: str) -> list[str]:
    """Lines of a captions file; a line that is not UTF-8 is read as cp1252 and counted."""
    lines = []
    for i, line in enumerate(raw.splitlines(keepends=True)):
        try:
            text = line.decode('utf-8')
        except UnicodeDecodeError:
            text = line.decode('cp1252', errors='replace')
            report.add('caption_not_utf8', f'{name}:{i + 1}')
        lines.append(text.lstrip('\ufeff') if i == 0 else text)
    return lines


def _rows(path: str, report: Report) -> list[tuple[str, str, str]]:
    """(file key, caption, where) of every well-formed row of a CSV or JSONL captions file."""
    name = os.path.basename(path)
    with open(path, 'rb') as f:
        lines = _decode_lines(f.read(), report, name)
    rows = []
    if name.endswith('.jsonl'):
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = next(record[k] for k in FILE_KEYS if k in record)
                caption = next(record[k] for k in CAPTION_KEYS if k in record)
                if not isinstance(key, str) or not isinstance(caption, str):
                    raise TypeError
            except (ValueError, StopIteration, TypeError, AttributeError):
                report.add('caption_malformed_row', f'{name}:{i + 1}')
                continue
            rows.append((key, caption, f'{name}:{i + 1}'))
        return rows
    table = list(csv.reader(lines))
    file_col, caption_col = 0, 1
    if table and table[0] and table[0][0].strip().lower() in FILE_KEYS:  # a header row
        header = [h.strip().lower() for h in table.pop(0)]
        file_col = next((header.index(k) for k in FILE_KEYS if k in header), 0)
        caption_col = next((header.index(k) for k in CAPTION_KEYS if k in header), 1)
        first = 2
    else:
        first = 1
    for i, row in enumerate(table):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(file_col, caption_col):
            report.add('caption_malformed_row', f'{name}:{i + first}')
            continue
        rows.append((row[file_col], row[caption_col], f'{name}:{i + first}'))
    return rows


def clean_caption(text: str, max_chars: int) -> tuple[str, bool]:
    """Whitespace and control characters collapsed to single spaces; cut at a word boundary
    when longer than max_chars. Returns (caption, whether it was cut)."""
    text = ' '.join(''.join(c if c.isprintable() else ' ' for c in text).split())
    if len(text) <= max_chars:
        return text, False
    cut = text[:max_chars + 1].rsplit(' ', 1)[0]
    return (cut if cut and len(cut) <= max_chars else text[:max_chars]), True


def _aliases(relpath: str) -> list[str]:
    """The names a caption row may use for an image: its relative path or bare file name,
    each with or without the extension (case-insensitive)."""
    rel = relpath.casefold()
    base = posixpath.basename(rel)
    return list(dict.fromkeys([rel, posixpath.splitext(rel)[0], base,
                               posixpath.splitext(base)[0]]))


def match_captions(path: str, images: set[str], report: Report, max_chars: int
                   ) -> dict[str, str]:
    """{image relative path: caption} from a captions file, counting every problem.

    An exact relative path wins; otherwise the aliases of `_aliases` are tried."""
    index: dict[str, set[str]] = collections.defaultdict(set)
    for relpath in images:
        for alias in _aliases(relpath):
            index[alias].add(relpath)
    captions: dict[str, str] = {}
    for key, text, where in _rows(path, report):
        key = posixpath.normpath(key.strip().replace('\\', '/'))
        if key.startswith(('/', '../')) or key == '..':
            report.add('caption_unsafe_path', where)
            continue
        found = ({key} if key in images else index.get(key.casefold())
                 or index.get(posixpath.splitext(key.casefold())[0]) or set())
        if not found:
            report.add('caption_without_image', where)
            continue
        if len(found) > 1:
            report.add('caption_ambiguous_name', where)
            continue
        (relpath,) = found
        if relpath in captions:
            report.add('caption_duplicate', where)
            continue
        caption, cut = clean_caption(text, max_chars)
        if not caption:
            report.add('caption_empty', where)
        if cut:
            report.add('caption_truncated', where)
        captions[relpath] = caption
    return captions


# The folder -----------------------------------------------------------------------------

def _walk(root: str) -> list[str]:
    """Relative POSIX paths of the files below root, sorted; hidden entries are ignored."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        rel = os.path.relpath(dirpath, root)
        found += [posixpath.normpath(posixpath.join(rel.replace(os.sep, '/'), f))
                  for f in filenames if not f.startswith('.')]
    return sorted(found)


def _is_regular_file(path: str) -> bool:
    """Whether `path` (links followed) is a regular file, decided without opening it: a FIFO
    would block its reader forever, and a device never ends."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # vanished, a broken link, or unreadable metadata
        return False


def _subdirs(path: str) -> list[str]:
    return sorted(d.name for d in os.scandir(path) if d.is_dir() and not d.name.startswith('.'))


def layout(folder: str) -> tuple[bool, list[str]]:
    """(whether train/ and test/ are the splits, the class names)."""
    has_splits = set(SPLIT_DIRS) <= set(_subdirs(folder))
    roots = [os.path.join(folder, s) for s in SPLIT_DIRS] if has_splits else [folder]
    return has_splits, sorted({c for r in roots for c in _subdirs(r)})


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A folder of images with optional class subfolders and captions; see the module doc."""

    name = 'image_folder'
    VERSION = tfds.core.Version('1.1.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.',
                     '1.1.0': 'RGB JPEGs keep their own bytes; built in N processes, resumable.'}
    MAX_SIDE = 512  # longer side of a stored image
    MIN_SIDE = 8
    MAX_PIXELS = 100_000_000  # above this a file is a decompression bomb and is never decoded
    MAX_CAPTION_CHARS = 1000
    TEST_FRACTION = 0.05

    def __init__(self, *, folder: str, num_workers: int = 0, **kwargs: Any):
        self._folder = os.path.abspath(folder)
        self._num_workers = num_workers  # processes that decode and convert (0: this one)
        self._has_splits, self._classes = layout(self._folder)
        kwargs.setdefault('config', tfds.core.BuilderConfig(name=config_name(self._folder)))
        super().__init__(**kwargs)
        # tfds re-creates pickled builders from _original_state; keep the folder there too.
        self._original_state['folder'] = folder
        self._original_state['num_workers'] = num_workers

    def _info(self) -> tfds.core.DatasetInfo:
        # PNG, or an RGB JPEG's own bytes: readers decode either.
        features = {'image': tfds.features.Image(shape=(None, None, 3)),
                    'caption': tfds.features.Text(),
                    'file_name': tfds.features.Text()}
        if self._classes:
            features['label'] = tfds.features.ClassLabel(names=self._classes)
        return tfds.core.DatasetInfo(
            builder=self, description=f'Images of {self._folder}.\n{__doc__}',
            features=tfds.features.FeaturesDict(features),
            supervised_keys=('image', 'label') if self._classes else None,
            metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # the files are local
        self._report = Report()
        captions_files = [f for f in CAPTION_FILES
                          if os.path.isfile(os.path.join(self._folder, f))]
        if len(captions_files) > 1:
            raise DataError(f'{self._folder} holds several captions files {captions_files}; '
                            'keep one of them.')
        self._captions_file = captions_files[0] if captions_files else None
        candidates = self._candidates([f for f in _walk(self._folder)
                                       if f not in captions_files])
        self._captions = ({} if self._captions_file is None else match_captions(
            os.path.join(self._folder, self._captions_file), set(candidates), self._report,
            self.MAX_CAPTION_CHARS))
        self._written_names: set[str] = set()
        self._written_paths: set[str] = set()
        # Ordered by a hash of the name (so files of one name are adjacent, a captioned one
        # first: of `a.jpg` and `a.png` the captioned one is kept).
        candidates.sort(key=lambda c: (self._name_hash(c), c not in self._captions, c))
        outcomes = self._convert(candidates)
        if self._has_splits:
            def of_split(split):
                return ((r, o) for r, o in outcomes() if r.split('/', 1)[0] == split)
            return {s: self._generate_examples(s, of_split(s), None) for s in ('test', 'train')}
        # The held-out images are a deterministic random pick: 'test' is generated first
        # and takes the first `wanted` good ones in hash order; 'train' the rest.
        queue = outcomes()
        wanted = max(1, round(self.TEST_FRACTION * len(candidates)))
        return {'test': self._generate_examples('test', queue, wanted),
                'train': self._generate_examples('train', queue, None)}

    def _convert(self, candidates: list[str]):
        """Decodes and converts every candidate in units of FILES_PER_UNIT files, in
        `num_workers` processes, saved per unit (a killed build resumes after the units it
        finished); returns a function that iterates (relpath, outcome) in candidate order."""
        units = [(self._folder, tuple(candidates[i:i + FILES_PER_UNIT]), self.MAX_SIDE,
                  self.MIN_SIDE, self.MAX_PIXELS)
                 for i in range(0, len(candidates), FILES_PER_UNIT)]
        self._work_dir = work_units.work_dir_of(self)
        work_units.run_units(self._work_dir, units, convert_files,
                             num_workers=self._num_workers,
                             plan=work_units.plan_digest(units, {'version': str(self.VERSION)}),
                             what=f'image_folder {self._folder}')

        def outcomes():
            for index in range(len(units)):
                yield from work_units.unit_result(self._work_dir, index)
        return outcomes

    def _candidates(self, files: list[str]) -> list[str]:
        """The image files worth decoding; the rest are counted as skipped."""
        extensions = _image_extensions()
        root = os.path.realpath(self._folder)
        depth = 1 if self._has_splits else 0  # path parts before the class folder
        kept = []
        for relpath in files:
            self._report.add('files_seen')
            parts = relpath.split('/')
            if self._has_splits and parts[0] not in SPLIT_DIRS:
                self._report.add('skipped_unfiled', relpath)
            elif self._classes and len(parts) < depth + 2:
                self._report.add('skipped_unfiled', relpath)  # no class folder: no label
            elif os.path.commonpath([root, os.path.realpath(
                    os.path.join(self._folder, relpath))]) != root:
                self._report.add('skipped_link_outside_folder', relpath)
            elif not _is_regular_file(os.path.join(self._folder, relpath)):
                self._report.add('skipped_not_a_regular_file', relpath)
            elif posixpath.splitext(relpath)[1].lower() not in extensions:
                self._report.add('skipped_not_an_image', relpath)
            else:
                kept.append(relpath)
        return kept

    @staticmethod
    def _name_hash(relpath: str) -> str:
        return hashlib.sha1(posixpath.splitext(relpath)[0].casefold().encode()).hexdigest()

    def _generate_examples(self, split: str, queue, wanted: int | None):
        """Examples from the (relpath, outcome) iterator `queue` until `wanted` are written
        (None: all of it)."""
        written = 0
        while wanted is None or written < wanted:
            try:
                relpath, outcome = next(queue)
            except StopIteration:
                break
            example = self._example(relpath, outcome)
            if example is not None:
                written += 1
                self._report.add(f'written_{split}')
                yield relpath, example
        if written == 0:
            raise DataError(f'{self._folder} has no usable image for the {split!r} split.\n'
                            + format_summary(self._summary()))
        if split == 'train':  # generated last
            for relpath in sorted(set(self._captions) - self._written_paths):
                self._report.add('caption_of_skipped_image', relpath)
            self.info.metadata['summary'] = self._summary()
            print(format_summary(self._summary()), flush=True)
            work_units.remove(self._work_dir)

    def _example(self, relpath: str, outcome: tuple) -> dict[str, Any] | None:
        """The feature dict of one converted file, or None (counted) when it is left out."""
        name = posixpath.splitext(relpath)[0].casefold()
        if name in self._written_names:
            self._report.add('skipped_duplicate_name', relpath)
            return None
        if outcome[0] == 'skip':
            self._report.add(f'skipped_{outcome[1]}', relpath)
            return None
        _, data, mode, resized, as_is = outcome
        self._written_names.add(name)
        self._written_paths.add(relpath)
        if mode != 'RGB':
            self._report.add(f'converted_from_{mode}', relpath)
        if resized:
            self._report.add('resized', relpath)
        if as_is:
            self._report.add('kept_jpeg_bytes', relpath)
        if self._captions_file is not None and relpath not in self._captions:
            self._report.add('image_without_caption', relpath)
        example = {'image': data, 'caption': self._captions.get(relpath, ''),
                   'file_name': relpath}
        if self._classes:
            example['label'] = relpath.split('/')[1 if self._has_splits else 0]
        return example

    def _summary(self) -> dict[str, Any]:
        return {'folder': self._folder, 'captions_file': self._captions_file,
                **self._report.to_json()}


def format_summary(summary: dict[str, Any]) -> str:
    """The build report a user reads: what was kept, converted and skipped, and examples."""
    counts, examples = summary['counts'], summary['examples']
    folder, captions_file = summary['folder'], summary['captions_file']
    written = {k[len('written_'):]: v for k, v in counts.items() if k.startswith('written_')}
    lines = [f'image_folder {folder}: {sum(written.values())} images written '
             f'({", ".join(f"{k} {v}" for k, v in sorted(written.items()))}) of '
             f'{counts.get("files_seen", 0)} files; captions from {captions_file or "(none)"}.']
    for key in sorted(counts):
        if key.startswith(('written_', 'files_seen')):
            continue
        shown = ', '.join(examples.get(key, []))
        more = ', ...' if counts[key] > len(examples.get(key, [])) else ''
        lines.append(f'  {key}: {counts[key]}' + (f'  ({shown}{more})' if shown else ''))
    return '\n'.join(lines)
