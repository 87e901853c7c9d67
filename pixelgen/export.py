"""python -m pixelgen.export --to FORMAT --workdir W --out DIR [--step N]

Writes a trained (or converted) pixelgen model in another format. Formats (--to):
  hf-imagegpt   an iGPT (AR objective, looped or scanned layers) as transformers'
                ImageGPTForCausalImageModeling: model.safetensors, config.json, and
                preprocessor_config.json whose `clusters` are the palette
  hf-clip       a CLIP as transformers' CLIPModel: model.safetensors, config.json,
                preprocessor_config.json (CLIPImageProcessor), and the tokenizer: CLIP's own
                BPE as vocab.json + merges.txt (+ tokenizer.json), or a BPE trained here as a
                tokenizer.json that PreTrainedTokenizerFast loads
  hf-vit        a ViT classifier as transformers' ViTForImageClassification: model.safetensors,
                config.json (with the class names), preprocessor_config.json (ViTImageProcessor)
  safetensors   any task: the parameter tree as model.safetensors, each tensor named by its
                path ('encoder/transformer/blocks/0/attn/query/kernel'), and pixelgen's
                config.json
Every `from_pretrained(DIR)` gives the logits / embeddings that pixelgen computes, and
`python -m pixelgen.convert --from hf-... --src DIR` imports the folder back. --out may be a
local folder or a URL (gs://...); it must not exist yet or be empty.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save as safetensors_bytes

from pixelgen import cli, storage
from pixelgen.config import ConfigError, save_config

FORMATS = ('hf-imagegpt', 'hf-clip', 'hf-vit', 'safetensors')
TASK_OF = {'hf-imagegpt': 'igpt', 'hf-clip': 'clip', 'hf-vit': 'vit'}


def parameter_tree(model: nnx.Module) -> dict:
    """The model's parameters as a pure dict of host numpy arrays."""
    return jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(nnx.state(model,
                                                                              nnx.Param))))


def flat_names(tree: dict, prefix: str = '') -> dict[str, np.ndarray]:
    """{'a/b/c': array} of a nested dict of arrays."""
    out = {}
    for key, value in tree.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            out.update(flat_names(value, name + '/'))
        else:
            out[name] = np.asarray(value).copy(order='C')  # 0-d stays 0-d
    return out


def _write_json(out: str, name: str, value: dict) -> None:
    storage.write_text(storage.join(out, name), json.dumps(value, indent=2) + '\n')


def _write_weights(out: str, tensors: dict[str, np.ndarray]) -> None:
    tensors = {k: np.asarray(v, np.float32).copy(order='C') for k, v in tensors.items()}
    storage.write_bytes(storage.join(out, 'model.safetensors'),
                        safetensors_bytes(tensors, metadata={'format': 'pt'}))


# safetensors ----------------------------------------------------------------------------

def export_safetensors(loaded, out: str) -> str:
    tensors = flat_names(parameter_tree(loaded.model))
    storage.write_bytes(storage.join(out, 'model.safetensors'), safetensors_bytes(
        tensors, metadata={'format': 'pixelgen', 'task': loaded.config.task,
                           'step': str(loaded.step)}))
    save_config(loaded.config, out)
    return f'{len(tensors)} tensors of task {loaded.config.task!r}'


# hf-vit ---------------------------------------------------------------------------------

def _vit_class_names(config) -> list[str] | None:
    """The label names of the run's dataset, where it can be opened here."""
    from pixelgen.data import pipeline
    from pixelgen.tasks.vit import class_names
    d = config.data
    try:
        source = pipeline.open_source(d.dataset, d.train_split, d.data_dir)
        names = class_names(source, d.label_key)
    except (pipeline.DataError, OSError, KeyError):
        return None
    return names if len(names) == config.model.num_classes else None


def export_hf_vit(loaded, out: str) -> str:
    from pixelgen.convert import hf_vit
    config = loaded.config
    tensors = hf_vit.hf_state_dict(parameter_tree(loaded.model), config)
    names = _vit_class_names(config)
    _write_weights(out, tensors)
    _write_json(out, 'config.json', hf_vit.hf_config(config, names))
    _write_json(out, 'preprocessor_config.json', hf_vit.hf_processor(config))
    return (f'ViTForImageClassification, {config.model.num_classes} classes '
            f'({"named from the dataset" if names else "LABEL_i"})')


# hf-imagegpt ----------------------------------------------------------------------------

def _igpt_blocks(transformer: dict, num_layers: int) -> list[dict]:
    """Per-layer block parameters, from the looped ({i: block}) or scanned (stacked) layout."""
    blocks = transformer['blocks']
    if all(isinstance(k, int) for k in blocks):
        return [blocks[i] for i in range(num_layers)]
    return [jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(num_layers)]


def export_hf_imagegpt(loaded, out: str) -> str:
    from pixelgen.tasks import igpt
    config = loaded.config
    objective = igpt.objective(config)
    if objective != 'ar':
        raise ConfigError(f'{loaded.workdir} is an iGPT with objective={objective!r}. '
                          "transformers' ImageGPT is autoregressive only (a start-of-sequence "
                          'token, causal attention), so a BERT model has no equivalent there. '
                          'Export it with --to safetensors.')
    if igpt.num_classes(config):
        raise ConfigError(f'{loaded.workdir} has a classification head (model.num_classes='
                          f'{igpt.num_classes(config)}), which ImageGPTForCausalImageModeling '
                          'has no place for. Export it with --to safetensors.')
    palette = loaded.palette
    if palette is None:
        raise FileNotFoundError(f'{loaded.workdir} has no palette.npy; the exported image '
                                'processor needs its colour clusters.')
    m = config.model
    p = parameter_tree(loaded.model)
    d, heads = m.width, m.num_heads
    hidden = m.mlp_ratio * d
    k = config.data.palette_size
    tensors = {
        # HF's start of sequence is token k: the sos vector is wte's last row
        'transformer.wte.weight': np.concatenate([p['wte']['embedding'], p['sos'][None]]),
        'transformer.wpe.weight': p['wpe'],
        'transformer.ln_f.weight': p['ln_f']['scale'],
        'lm_head.weight': p['head']['kernel'].T,
    }
    for i, b in enumerate(_igpt_blocks(p['transformer'], m.num_layers)):
        prefix = f'transformer.h.{i}.'
        qkv = np.concatenate([b['attn'][name]['kernel'].reshape(d, d)
                              for name in ('query', 'key', 'value')], axis=1)  # [d, 3d]
        tensors.update({
            prefix + 'ln_1.weight': b['norm1']['scale'],
            prefix + 'ln_2.weight': b['norm2']['scale'],
            prefix + 'attn.c_attn.weight': qkv,
            prefix + 'attn.c_attn.bias': np.zeros(3 * d, np.float32),
            prefix + 'attn.c_proj.weight': b['attn']['out']['kernel'].reshape(d, d),
            prefix + 'attn.c_proj.bias': np.zeros(d, np.float32),
            prefix + 'mlp.c_fc.weight': b['mlp']['fc']['kernel'],
            prefix + 'mlp.c_fc.bias': np.zeros(hidden, np.float32),
            prefix + 'mlp.c_proj.weight': b['mlp']['proj']['kernel'],
            prefix + 'mlp.c_proj.bias': np.zeros(d, np.float32),
        })
    _write_weights(out, tensors)
    _write_json(out, 'config.json', {
        'architectures': ['ImageGPTForCausalImageModeling'], 'model_type': 'imagegpt',
        'vocab_size': k + 1, 'n_positions': config.data.image_size ** 2, 'n_embd': d,
        'n_layer': m.num_layers, 'n_head': heads, 'n_inner': hidden,
        'activation_function': 'quick_gelu', 'layer_norm_epsilon': 1e-5,
        'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0,
        'scale_attn_weights': True, 'scale_attn_by_inverse_layer_idx': False,
        'reorder_and_upcast_attn': False, 'add_cross_attention': False,
        'tie_word_embeddings': False, 'initializer_range': 0.02, 'torch_dtype': 'float32'})
    side = config.data.image_size
    _write_json(out, 'preprocessor_config.json', {
        'image_processor_type': 'ImageGPTImageProcessor', 'clusters': palette.tolist(),
        'do_resize': True, 'size': {'height': side, 'width': side}, 'resample': 2,
        'do_normalize': True, 'do_color_quantize': True})
    layout = 'scanned' if m.get('scan_layers', False) else 'looped'
    return f'ImageGPTForCausalImageModeling ({layout} layers), {k} colours, {side}x{side}'


# hf-clip --------------------------------------------------------------------------------

def _clip_tower(blocks: dict, prefix: str) -> dict[str, np.ndarray]:
    """A CLIP tower's blocks (looped, {i: block}) -> HF's encoder.layers.<i>.* tensors."""
    out = {}
    for i, b in blocks.items():
        p = f'{prefix}.encoder.layers.{i}.'
        width = b['norm1']['scale'].shape[0]
        for name, hf in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
            out[p + f'self_attn.{hf}.weight'] = b['attn'][name]['kernel'].reshape(width, -1).T
            out[p + f'self_attn.{hf}.bias'] = b['attn'][name]['bias'].reshape(-1)
        out[p + 'self_attn.out_proj.weight'] = b['attn']['out']['kernel'].reshape(-1, width).T
        out[p + 'self_attn.out_proj.bias'] = b['attn']['out']['bias']
        for norm, hf in (('norm1', 'layer_norm1'), ('norm2', 'layer_norm2')):
            out[p + f'{hf}.weight'] = b[norm]['scale']
            out[p + f'{hf}.bias'] = b[norm]['bias']
        for name, hf in (('fc', 'fc1'), ('proj', 'fc2')):
            out[p + f'mlp.{hf}.weight'] = b['mlp'][name]['kernel'].T
            out[p + f'mlp.{hf}.bias'] = b['mlp'][name]['bias']
    return out


def _norm(tree: dict, name: str) -> dict[str, np.ndarray]:
    return {f'{name}.weight': tree['scale'], f'{name}.bias': tree['bias']}


def clip_state_dict(p: dict, config) -> dict[str, np.ndarray]:
    """The inverse of pixelgen.convert.hf_clip.params_from_hf: CLIPModel tensors."""
    v, t = p['visual'], p['text']
    kernel = v['patch_embed']['kernel']  # [(p1 p2 c), width]
    ps, width = config.model.patch_size, kernel.shape[1]
    return {
        'vision_model.embeddings.patch_embedding.weight':
            kernel.reshape(ps, ps, 3, width).transpose(3, 2, 0, 1),
        'vision_model.embeddings.class_embedding': v['class_embedding'],
        'vision_model.embeddings.position_embedding.weight': v['position_embedding'],
        **_norm(v['ln_pre'], 'vision_model.pre_layrnorm'),
        **_clip_tower(v['transformer']['blocks'], 'vision_model'),
        **_norm(v['ln_post'], 'vision_model.post_layernorm'),
        'visual_projection.weight': v['proj']['kernel'].T,
        'text_model.embeddings.token_embedding.weight': t['token_embedding']['embedding'],
        'text_model.embeddings.position_embedding.weight': t['position_embedding'],
        **_clip_tower(t['transformer']['blocks'], 'text_model'),
        **_norm(t['ln_final'], 'text_model.final_layer_norm'),
        'text_projection.weight': t['proj']['kernel'].T,
        'logit_scale': np.asarray(p['logit_scale'], np.float32).reshape(()),
    }


def _swap_rows(table: np.ndarray, a: int, b: int) -> np.ndarray:
    table = np.array(table)
    table[[a, b]] = table[[b, a]]
    return table


def trained_tokenizer_json(tokenizer, eot_id: int, context_length: int) -> str:
    """A TextTokenizer's tokenizer.json for PreTrainedTokenizerFast: [SOT] text [EOT] added
    by a post-processor, [EOT] renumbered to `eot_id` (it swaps ids with the token there)."""
    from tokenizers import Tokenizer, processors
    spec = json.loads(tokenizer._tokenizer.to_str())
    old = tokenizer.eot_id
    renumber = {old: eot_id, eot_id: old}
    vocab = spec['model']['vocab']
    spec['model']['vocab'] = {tok: renumber.get(i, i) for tok, i in vocab.items()}
    for token in spec['added_tokens']:
        token['id'] = renumber.get(token['id'], token['id'])
    spec['truncation'] = {'direction': 'Right', 'max_length': context_length,
                          'strategy': 'LongestFirst', 'stride': 0}
    out = Tokenizer.from_str(json.dumps(spec))
    out.post_processor = processors.TemplateProcessing(
        single='[SOT] $A [EOT]', special_tokens=[('[SOT]', tokenizer.sot_id), ('[EOT]', eot_id)])
    return out.to_str(pretty=True)


def _clip_bpe_files(tokenizer, out: str, context_length: int) -> None:
    """CLIP's own BPE as CLIPTokenizer files: vocab.json, merges.txt, tokenizer.json."""
    spec = json.loads(tokenizer._tokenizer.to_str())
    merges = [m if isinstance(m, str) else ' '.join(m) for m in spec['model']['merges']]
    storage.write_text(storage.join(out, 'vocab.json'),
                       json.dumps(tokenizer._tokenizer.get_vocab(), ensure_ascii=False))
    storage.write_text(storage.join(out, 'merges.txt'), '#version: 0.2\n' + '\n'.join(merges)
                       + '\n')
    _write_json(out, 'tokenizer_config.json', {
        'tokenizer_class': 'CLIPTokenizer', 'bos_token': '<|startoftext|>',
        'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>',
        'unk_token': '<|endoftext|>', 'model_max_length': context_length,
        'do_lower_case': True})


def export_hf_clip(loaded, out: str) -> str:
    from pixelgen.data.clip_bpe import ClipBPETokenizer
    config = loaded.config
    m = config.model
    tokenizer = loaded.assets.get('tokenizer')
    p = parameter_tree(loaded.model)
    tensors = clip_state_dict(p, config)
    eot, sot, pad = m.eot_id, None, None
    kind = 'no tokenizer (none in the workdir)'
    if isinstance(tokenizer, ClipBPETokenizer):
        _clip_bpe_files(tokenizer, out, m.context_length)
        storage.write_text(storage.join(out, 'tokenizer.json'),
                           tokenizer._tokenizer.to_str(pretty=True))
        sot, pad, kind = tokenizer.sot_id, tokenizer.pad_id, "CLIP's BPE (CLIPTokenizer files)"
    elif tokenizer is not None:
        # transformers pools CLIP's text at the largest token id when eos_token_id == 2
        # (OpenAI's legacy configs); a trained tokenizer's [EOT] is 2, so it moves to the
        # last id of the tokenizer, rows of the embedding swapped with it.
        eot = tokenizer.vocab_size - 1
        table = tensors['text_model.embeddings.token_embedding.weight']
        tensors['text_model.embeddings.token_embedding.weight'] = _swap_rows(
            table, tokenizer.eot_id, eot)
        storage.write_text(storage.join(out, 'tokenizer.json'),
                           trained_tokenizer_json(tokenizer, eot, m.context_length))
        _write_json(out, 'tokenizer_config.json', {
            'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '[SOT]',
            'eos_token': '[EOT]', 'pad_token': '[PAD]', 'model_max_length': m.context_length,
            'padding_side': 'right'})
        sot, pad = tokenizer.sot_id, tokenizer.pad_id
        kind = 'the trained byte-level BPE (tokenizer.json, PreTrainedTokenizerFast)'
    elif eot == 2:  # no tokenizer to renumber, but the same pooling rule applies
        eot = m.vocab_size - 1
        table = tensors['text_model.embeddings.token_embedding.weight']
        tensors['text_model.embeddings.token_embedding.weight'] = _swap_rows(table, 2, eot)
        kind += f'; end-of-text id 2 renumbered to {eot}'
    _write_weights(out, tensors)
    act = m.activation
    text = {'vocab_size': m.vocab_size, 'hidden_size': m.text_width,
            'intermediate_size': m.mlp_ratio * m.text_width,
            'num_hidden_layers': m.text_layers, 'num_attention_heads': m.text_heads,
            'max_position_embeddings': m.context_length, 'hidden_act': act,
            'layer_norm_eps': 1e-5, 'eos_token_id': eot, 'bos_token_id': sot,
            'pad_token_id': pad, 'projection_dim': m.embed_dim, 'model_type': 'clip_text_model'}
    vision = {'hidden_size': m.vision_width, 'intermediate_size': m.mlp_ratio * m.vision_width,
              'num_hidden_layers': m.vision_layers, 'num_attention_heads': m.vision_heads,
              'image_size': config.data.image_size, 'patch_size': m.patch_size,
              'hidden_act': act, 'layer_norm_eps': 1e-5, 'num_channels': 3,
              'projection_dim': m.embed_dim, 'model_type': 'clip_vision_model'}
    _write_json(out, 'config.json', {
        'architectures': ['CLIPModel'], 'model_type': 'clip', 'projection_dim': m.embed_dim,
        'logit_scale_init_value': float(p['logit_scale']), 'text_config': text,
        'vision_config': vision, 'torch_dtype': 'float32'})
    side = config.data.image_size
    _write_json(out, 'preprocessor_config.json', {
        'image_processor_type': 'CLIPImageProcessor', 'do_resize': True,
        'size': {'shortest_edge': side}, 'resample': 3, 'do_center_crop': True,
        'crop_size': {'height': side, 'width': side}, 'do_rescale': True,
        'rescale_factor': 1 / 255, 'do_normalize': True, 'do_convert_rgb': True,
        'image_mean': list(m.image_mean), 'image_std': list(m.image_std)})
    return f'CLIPModel; tokenizer: {kind}'


EXPORTERS = {'hf-imagegpt': export_hf_imagegpt, 'hf-clip': export_hf_clip,
             'hf-vit': export_hf_vit, 'safetensors': export_safetensors}


def export(workdir: str, fmt: str, out: str, step: int | None = None) -> str:
    """Writes `workdir`'s model (latest checkpoint, or `step`) to `out` in format `fmt`;
    returns a summary line."""
    import pixelgen
    if fmt not in EXPORTERS:
        raise ConfigError(f'--to {fmt!r} is not a format; expected one of {FORMATS}.')
    if storage.exists(out) and storage.listdir(out):
        raise ConfigError(f'--out {out} already holds files; export into a new folder.')
    loaded = pixelgen.load(workdir, step)
    task = loaded.config.task
    if fmt in TASK_OF and TASK_OF[fmt] != task:
        raise ConfigError(f'--to {fmt} exports task {TASK_OF[fmt]!r}, but {workdir} is a '
                          f'{task!r} run. Use --to '
                          f'{next((f for f, t in TASK_OF.items() if t == task), "safetensors")}'
                          ' (or --to safetensors, for any task).')
    storage.makedirs(out)
    summary = EXPORTERS[fmt](loaded, out)
    return f'{workdir} step {loaded.step} -> {out}: {summary}'


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='python -m pixelgen.export', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--to', dest='fmt', required=True, choices=FORMATS)
    parser.add_argument('--workdir', required=True, help='a pixelgen workdir (local or gs://)')
    parser.add_argument('--out', required=True, help='the new folder (local or gs://)')
    parser.add_argument('--step', type=int, default=None,
                        help='the checkpoint to export (default: the latest)')
    args = parser.parse_args(argv)
    print(f'[export] {export(args.workdir, args.fmt, args.out, args.step)}')
    return 0


if __name__ == '__main__':
    cli.run(main)
