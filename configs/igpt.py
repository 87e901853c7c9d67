"""Image GPT at the paper's sizes (Chen et al. 2020, "Generative Pretraining from Pixels").

  python -m pixelgen.train --config configs/igpt.py:s --workdir W        # iGPT-S, 32x32
  python -m pixelgen.train --config configs/igpt.py:l,res=48 --workdir W # iGPT-L, 48x48
  python -m pixelgen.train --config configs/igpt.py:xl --workdir W       # iGPT-XL, 64x64

The arg is `size[,res=N][,dataset=NAME][,objective=ar|bert]`. Sizes (P2 §3.3):
  s   24 layers,  512 wide,  8 heads    76M parameters   32x32
  m   36 layers, 1024 wide,  8 heads   455M              32x32
  l   48 layers, 1536 wide, 16 heads  1362M              32x32 (48x48 also trained)
  xl  60 layers, 3072 wide, 24 heads  6801M              64x64
XL's head count is not stated in the paper; we use 24 (head_dim 128, as L's 96 rounded up
to the TPU-friendly 128). Batch 128 (XL 64), Adam β2 = 0.95, one epoch of linear warm-up
then cosine decay to 0, no weight decay, no dropout, fp32 (paper §3.4). The learning rates
are the ones reported for the released runs (S 3e-3, M 1e-3, L 1e-3, XL 3e-4); tune them.
The dataset must be prepared in array_record format in `data.data_dir` (see README).

Datasets (tfds catalog names) and their splits, validation held out as in the paper (P2 §3.1):
  imagenet2012   train = train[:96%], validation = train[96%:], test = validation (the
                 official labelled evaluation split; ImageNet's own test split has no labels)
  cifar10, cifar100, stl10   train = train[:90%], validation = train[90%:], test = test
`data.eval_split` (evaluated during training) is the validation split; `data.test_split` is
the official test split (`python -m pixelgen.evaluate ... --option split=test`).
Resolutions: 32, 48 or 64 (res=), always with the 512-colour palette.
"""

import ml_collections

from pixelgen.data.pipeline import add_stream_config
from pixelgen.parallel import DEFAULT_RULES

SIZES = {  # layers, width, heads, image side, batch, learning rate, steps
    's': (24, 512, 8, 32, 128, 3e-3, 1_000_000),
    'm': (36, 1024, 8, 32, 128, 1e-3, 1_000_000),
    'l': (48, 1536, 16, 32, 128, 1e-3, 1_000_000),
    'xl': (60, 3072, 24, 64, 64, 3e-4, 2_000_000),
}
# tfds name -> (train, validation, test) split, and the size of the train split's share.
DATASETS = {
    'imagenet2012': ('train[:96%]', 'train[96%:]', 'validation', 1_229_920),
    'cifar10': ('train[:90%]', 'train[90%:]', 'test', 45_000),
    'cifar100': ('train[:90%]', 'train[90%:]', 'test', 45_000),
    'stl10': ('train[:90%]', 'train[90%:]', 'test', 4_500),
}
RESOLUTIONS = (32, 48, 64)
OBJECTIVES = ('ar', 'bert')


def _parse(arg):
    size, *options = (arg or 's').split(',')
    if size not in SIZES:
        raise ValueError(f'Unknown iGPT size {size!r}; expected one of {sorted(SIZES)}.')
    opts = dict(o.split('=', 1) for o in options)
    unknown = set(opts) - {'res', 'dataset', 'objective'}
    if unknown:
        raise ValueError(f'Unknown option(s) {sorted(unknown)} in {arg!r}; expected res=, '
                         'dataset=, objective=.')
    if 'res' in opts and int(opts['res']) not in RESOLUTIONS:
        raise ValueError(f'res={opts["res"]} in {arg!r}: the paper trains at {RESOLUTIONS}.')
    if opts.get('dataset', 'imagenet2012') not in DATASETS:
        raise ValueError(f'dataset={opts["dataset"]} in {arg!r}: expected one of '
                         f'{sorted(DATASETS)} (or override --config.data.dataset and the '
                         'data.*_split keys).')
    if opts.get('objective', 'ar') not in OBJECTIVES:
        raise ValueError(f'objective={opts["objective"]} in {arg!r}: expected one of '
                         f'{OBJECTIVES}.')
    return size, opts


def get_config(arg=None):
    size, opts = _parse(arg)
    layers, width, heads, side, batch, lr, steps = SIZES[size]
    train_split, validation_split, test_split, train_size = DATASETS[
        opts.get('dataset', 'imagenet2012')]
    c = ml_collections.ConfigDict()
    c.task = 'igpt'
    c.objective = opts.get('objective', 'ar')
    c.seed = 0
    c.total_steps = steps
    c.batch_size = batch
    c.grad_accum_steps = 1
    c.concurrent_microbatches = 1  # passes per micro-batch run side by side (2 on a CPU)
    c.checkpoint_every_steps = 5000
    c.keep_checkpoints = 3
    c.log_every_steps = 100
    c.eval_every_steps = 10000
    c.eval_examples = 10000
    c.sample_every_steps = 50000
    c.mesh = ml_collections.ConfigDict({'data': 1, 'fsdp': -1, 'tensor': 1})
    c.sharding_rules = DEFAULT_RULES  # logical axis name -> mesh axes (pixelgen/parallel.py)

    c.data = ml_collections.ConfigDict()
    c.data.dataset = opts.get('dataset', 'imagenet2012')
    c.data.data_dir = ''
    c.data.train_split = train_split
    c.data.eval_split = validation_split
    c.data.test_split = test_split
    c.data.random_crop_padding = 0
    c.data.random_flip = False
    c.data.image_size = int(opts.get('res', side))
    c.data.palette_size = 512
    c.data.palette_fit_images = 20000
    c.data.palette_fit_pixels_per_image = 16
    c.data.num_threads = 16
    c.data.prefetch = 8
    add_stream_config(c.data, captions=False)  # webdataset: / parquet: (docs/data.md)

    c.model = ml_collections.ConfigDict()
    c.model.num_layers = layers
    c.model.width = width
    c.model.num_heads = heads
    c.model.mlp_ratio = 4
    c.model.dtype = 'float32'
    # 'auto': splash on TPU, cuDNN on GPU (bfloat16 dense layers), block_sparse elsewhere.
    c.model.attention = 'auto'
    # Per device at the README's meshes: M needs 68 GiB without remat, 5.1 GiB with 'full'.
    c.model.remat = 'none' if size == 's' else 'full'
    c.model.num_classes = 0  # -1: a classifier head for the dataset's labels (fine-tuning)
    # Layers' parameters stacked on a leading axis and scanned over: one layer is compiled,
    # whatever the depth. False: the looped layout (blocks/<i>/...) of converted weights.
    c.model.scan_layers = True

    c.init_from = ''         # fine-tuning: the pretrained workdir (configs/igpt_finetune.py)
    c.init_from_step = -1
    c.classifier_loss_weight = 1.0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = lr
    c.optimizer.warmup_steps = train_size // batch   # one epoch
    c.optimizer.min_learning_rate_ratio = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.skip_nonfinite_updates = 5  # skip NaN/Inf steps, stop after 5 in a row

    c.sampling = ml_collections.ConfigDict()
    c.sampling.num_images = 8
    c.sampling.samples_per_image = 2
    c.sampling.temperature = 1.0
    c.sampling.top_k = 0
    return c
