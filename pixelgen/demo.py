"""python -m pixelgen.demo [--dalle W] [--clip C] [--igpt I] [--dvae_workdir D]
       [--port 7860] [--host 127.0.0.1] [--max_num 16]

A page in the browser for trying trained models, served by pixelgen itself (the standard
library's http.server; nothing to install, nothing fetched from the network):

  python -m pixelgen.demo --dalle runs/dalle_shapes --clip runs/clip_shapes \\
      --igpt runs/igpt_shapes
  # then open http://127.0.0.1:7860

Text to image (--dalle): a caption, the number of images, the seed, and with --clip the best
k kept by CLIP score (best first). Image GPT completion (--igpt): an uploaded picture is
resized to the model's images, quantised by its palette, and its top rows given; the rest is
drawn. At least one of --dalle and --igpt is needed.

The images equal those that `python -m pixelgen.sample` writes with --out_dir for the same
arguments and --seed: both call the same functions (pixelgen.sample.draw_dalle,
complete_rows, pixelgen.rerank.rerank). Models are loaded once, at start; requests are drawn
one at a time.

JSON endpoints, for scripts: GET /api/info; POST /api/dalle {prompt, num, top, seed};
POST /api/igpt {image: a data: URL or base64 of the file, name, rows, num, seed}. Each answers
{images: [PNG data: URLs], ...} or, for bad input, HTTP 400 {error: "..."}.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from pixelgen import cli, storage
from pixelgen.config import UserError

PAGE = 'demo_page.html'  # package data beside this module
MAX_BODY = 32 << 20  # bytes of one request: an uploaded picture, base64-encoded
MAX_SEED = 2 ** 31 - 1


class RequestError(UserError):
    """Bad input from the page; the message is shown there."""


def png_url(picture) -> str:
    """uint8 [h, w, 3] as a data: URL of a PNG."""
    return 'data:image/png;base64,' + base64.b64encode(storage.png_bytes(picture)).decode()


def _int_field(request: dict, key: str, default: int | None, low: int, high: int,
               label: str) -> int | None:
    """request[key] as an int in [low, high] (default when absent or empty)."""
    value = request.get(key)
    if value is None or value == '':
        return default
    try:
        number = int(value)
        if number != float(value):
            raise ValueError(value)
    except (TypeError, ValueError):
        raise RequestError(f'{label} must be a whole number, got {value!r}.') from None
    if not low <= number <= high:
        raise RequestError(f'{label} must be in [{low}, {high}], got {number}.')
    return number


def _load(workdir: str, flag: str, task: str):
    import pixelgen
    loaded = pixelgen.load(workdir)
    if loaded.config.task != task:
        raise cli.ConfigError(f'{flag} {workdir} holds a {loaded.config.task!r} model; '
                              f'{flag} takes a {task!r} workdir.')
    return loaded


class Demo:
    """The loaded models and the two things the page asks of them."""

    def __init__(self, *, dalle: str | None = None, clip: str | None = None,
                 igpt: str | None = None, dvae_workdir: str | None = None, max_num: int = 16):
        from pixelgen import sample, tasks

        if dalle is None and igpt is None:
            raise cli.ConfigError('Nothing to demo: pass --dalle W (text to image) and/or '
                                  '--igpt W (completing an uploaded picture).')
        if clip is not None and dalle is None:
            raise cli.ConfigError('--clip reranks DALL·E images: pass --dalle W too.')
        if dvae_workdir is not None and dalle is None:
            raise cli.ConfigError('--dvae_workdir decodes DALL·E codes: pass --dalle W too.')
        if max_num < 1:
            raise cli.ConfigError(f'--max_num must be at least 1, got {max_num}.')
        self.max_num, self.workdirs = max_num, {'dalle': dalle, 'clip': clip, 'igpt': igpt}
        self.lock = threading.Lock()  # one drawing at a time
        self.dalle = self.dvae = self.tokenizer = self.clip = self.igpt = self.igpt_task = None
        if dalle is not None:
            self.dalle = _load(dalle, '--dalle', 'dalle')
            self.tokenizer = self.dalle.assets.get('tokenizer')
            if self.tokenizer is None:
                raise FileNotFoundError(f'{dalle} has no tokenizer.json (a DALL·E training run '
                                        'writes one before its first step).')
            self.dvae = sample.load_dvae(self.dalle, dvae_workdir)
        if clip is not None:
            self.clip = _load(clip, '--clip', 'clip')
        if igpt is not None:
            self.igpt = _load(igpt, '--igpt', 'igpt')
            self.igpt_task = tasks.make(self.igpt.config, igpt)
            if self.igpt_task.objective == 'bert':
                raise cli.ConfigError(f'--igpt {igpt} holds a BERT-objective Image GPT, which '
                                      'fills in masked pixels and cannot complete rows; pass '
                                      'an autoregressive one.')

    def info(self) -> dict:
        """What the page shows and which controls it enables."""
        out = {'workdirs': self.workdirs, 'max_num': self.max_num, 'max_seed': MAX_SEED}
        if self.dalle is not None:
            out['dalle'] = {'step': self.dalle.step, 'text_len': self.dalle.model.text_len,
                            'rerank': self.clip is not None}
        if self.igpt is not None:
            side = self.igpt.config.data.image_size
            out['igpt'] = {'step': self.igpt.step, 'image_size': side, 'rows': side // 2}
        return out

    def text_to_image(self, request: dict) -> dict:
        """{prompt, num, top, seed} -> {images (best first when reranked), scores, warning}:
        what `pixelgen.sample --prompt P --num N --seed S [--clip_workdir C --top K]`
        draws."""
        from pixelgen import rerank, sample

        if self.dalle is None:
            raise RequestError('No DALL·E model: start the demo with --dalle W.')
        prompt = request.get('prompt')
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError('The caption is empty: type what the image should show, e.g. '
                               '"a large red star".')
        num = _int_field(request, 'num', 4, 1, self.max_num, 'The number of images')
        seed = _int_field(request, 'seed', 0, 0, MAX_SEED, 'The seed')
        top = _int_field(request, 'top', None, 1, num, 'Keep the best')
        if top is not None and top < num and self.clip is None:
            raise RequestError('Keeping the best images needs a CLIP model: start the demo '
                               'with --clip C, or leave "keep the best" empty.')
        model = self.dalle.model
        encoded = self.tokenizer.encode([prompt], model.text_len, add_sot_eot=True)
        warning = None
        if encoded.num_truncated:
            warning = (f'The caption is longer than the model\'s {model.text_len} tokens; it '
                       f'was cut to "{self.tokenizer.decode(encoded.ids)[0]}".')
        with self.lock:
            pictures = sample.draw_dalle(model, self.dvae, encoded.ids, num, seed)
            scores = None
            if self.clip is not None:
                order, all_scores = rerank.rerank(self.clip, pictures, prompt, top or num)
                pictures, scores = pictures[order], [float(all_scores[i]) for i in order]
        return {'images': [png_url(p) for p in pictures], 'scores': scores,
                'warning': warning, 'seed': seed}

    def complete(self, request: dict) -> dict:
        """{image, name, rows, num, seed} -> {given: the picture as the model sees it (resized
        and quantised), images: the completions}: what `pixelgen.sample --prime_image FILE
        --prime_rows R --num N --seed S` draws."""
        from pixelgen import images, sample

        if self.igpt is None:
            raise RequestError('No Image GPT model: start the demo with --igpt W.')
        name = str(request.get('name') or 'the upload')
        data = request.get('image')
        if not isinstance(data, str) or not data:
            raise RequestError('No picture: choose a PNG or JPEG file to complete.')
        try:
            raw = base64.b64decode(data.split(',', 1)[1] if data.startswith('data:') else data,
                                   validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f'{name}: the upload is not base64 data.') from None
        side = self.igpt.config.data.image_size
        rows = _int_field(request, 'rows', side // 2, 1, side - 1, 'The given rows')
        num = _int_field(request, 'num', 4, 1, self.max_num, 'The number of completions')
        seed = _int_field(request, 'seed', 0, 0, MAX_SEED, 'The seed')
        picture = images.decode_rgb(raw, name)
        original, tokens = sample.quantize_picture(self.igpt, picture)
        with self.lock:
            pictures = sample.complete_rows(self.igpt, self.igpt_task, tokens, rows, num, seed)
        given = self.igpt_task.to_images(tokens)[0]
        return {'given': png_url(given), 'resized': png_url(original), 'rows': rows,
                'images': [png_url(p) for p in pictures], 'seed': seed}


def make_server(demo: Demo, host: str = '127.0.0.1', port: int = 7860) -> ThreadingHTTPServer:
    """The page and its JSON endpoints on host:port (port 0: a free one; see
    server.server_address). Call serve_forever() on it."""
    page = resources.files('pixelgen').joinpath(PAGE).read_bytes()
    routes = {'/api/dalle': demo.text_to_image, '/api/igpt': demo.complete}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header('Content-Type', content_type)
            self.send_header('Content-Length', str(len(body)))
            self.send_header('Cache-Control', 'no-store')
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), 'application/json')

        def do_GET(self):  # noqa: N802  (http.server's name)
            path = self.path.split('?', 1)[0]
            if path in ('/', '/index.html'):
                self._send(200, page, 'text/html; charset=utf-8')
            elif path == '/api/info':
                self._json(200, demo.info())
            elif path == '/favicon.ico':
                self._send(204, b'', 'image/x-icon')
            else:
                self._json(404, {'error': f'{path}: no such page; open /.'})

        def do_POST(self):  # noqa: N802
            route = routes.get(self.path.split('?', 1)[0])
            if route is None:
                self._json(404, {'error': f'{self.path}: no such endpoint.'})
                return
            length = int(self.headers.get('Content-Length') or 0)
            if length > MAX_BODY:
                self._json(413, {'error': f'The upload is {length >> 20} MiB; the demo takes '
                                          f'up to {MAX_BODY >> 20} MiB. Pass a smaller '
                                          'picture.'})
                return
            try:
                request = json.loads(self.rfile.read(length) or b'{}')
                if not isinstance(request, dict):
                    raise RequestError('The request must be a JSON object.')
                self._json(200, route(request))
            except json.JSONDecodeError as e:
                self._json(400, {'error': f'The request is not JSON ({e.msg}).'})
            except cli.USER_ERRORS as e:
                self._json(400, {'error': str(e)})
            except Exception as e:  # noqa: BLE001  (the page shows it; the log keeps the trace)
                traceback.print_exc()
                self._json(500, {'error': f'The demo failed: {type(e).__name__}: {e}'})

        def log_message(self, format, *args):  # noqa: A002  (http.server's signature)
            print(f'[demo] {self.address_string()} {format % args}', file=sys.stderr)

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='python -m pixelgen.demo', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dalle', default=None, help='a DALL·E workdir: text to image')
    parser.add_argument('--clip', default=None,
                        help='a CLIP workdir: rerank the DALL·E images, keep the best k')
    parser.add_argument('--igpt', default=None,
                        help='an Image GPT workdir: complete an uploaded picture')
    parser.add_argument('--dvae_workdir', default=None,
                        help="decode DALL·E codes with this dVAE (default: the DALL·E config's "
                             'dvae_workdir)')
    parser.add_argument('--port', type=int, default=7860, help='0 picks a free port')
    parser.add_argument('--host', default='127.0.0.1',
                        help='the address to listen on (0.0.0.0: every interface)')
    parser.add_argument('--max_num', type=int, default=16,
                        help='the most images one request may draw')
    args = parser.parse_args(argv)
    demo = Demo(dalle=args.dalle, clip=args.clip, igpt=args.igpt,
                dvae_workdir=args.dvae_workdir, max_num=args.max_num)
    try:
        server = make_server(demo, args.host, args.port)
    except OSError as e:
        raise cli.ConfigError(f'Cannot listen on {args.host}:{args.port} ({e.strerror}); pass '
                              'another --port (0 picks a free one).') from e
    host, port = server.server_address[:2]
    print(f'[demo] serving on http://{host}:{port}  (Ctrl-C stops it)', flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print('[demo] stopped', file=sys.stderr)
    finally:
        server.server_close()
    return 0


if __name__ == '__main__':
    cli.run(main)
