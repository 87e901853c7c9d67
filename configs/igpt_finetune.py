"""Fine-tune a pretrained Image GPT as a classifier (P2 §3.6): L_GEN + w * L_CLF.

  python -m pixelgen.train --config configs/igpt_finetune.py:s,dataset=cifar10 \
      --config.init_from=runs/igpt_s --workdir runs/igpt_s_cifar10
  python -m pixelgen.train --config configs/igpt_finetune.py:shapes \
      --config.init_from=runs/igpt_shapes --workdir runs/igpt_shapes_ft

The arg is a configs/igpt.py arg (`size[,res=N][,dataset=NAME][,objective=ar|bert]`) or
`shapes` / `shapes_tiny` (configs/igpt_shapes.py, the CPU demo and the tests). The model and
data keys must equal the pretrained run's (checked against `<init_from>/config.json`), except
`model.scan_layers`: looped and scanned layers are converted into each other.

What changes from pretraining, as in the paper:
  - the run starts from `init_from`'s parameters (step `init_from_step`, -1 = latest) and its
    palette; a bias-free classification head on the average-pooled final normalised output is
    added, with as many classes as the dataset's `label` feature (`model.num_classes=-1`);
  - the loss is L_GEN + classifier_loss_weight * L_CLF (weight 1: the paper's joint objective,
    which beat L_CLF alone); eval reports `accuracy` and `clf_loss` beside the loss;
  - the learning rate is 10x lower and constant after a short warm-up (no cosine decay; the
    paper early-stops on validation accuracy: pick the checkpoint with the best eval/accuracy);
  - training images are randomly cropped (zero-padded by 1/8 of the side) and flipped.
"""

from pixelgen.configs import igpt, igpt_shapes


def get_config(arg=None):
    arg = arg or 's'
    if arg in ('shapes', 'shapes_tiny'):
        c = igpt_shapes.get_config('tiny' if arg == 'shapes_tiny' else None)
        total_steps, epoch_steps = 600, 200  # a CPU demo: about 0.5 epoch of shapes
    else:
        c = igpt.get_config(arg)
        epoch_steps = igpt.DATASETS[c.data.dataset][3] // c.batch_size
        total_steps = 20 * epoch_steps

    c.model.num_classes = -1  # from the dataset's label feature
    c.classifier_loss_weight = 1.0
    c.init_from = ''          # required: the pretrained workdir
    c.init_from_step = -1
    c.data.random_crop_padding = max(1, c.data.image_size // 8)
    c.data.random_flip = True
    c.optimizer.learning_rate /= 10
    c.optimizer.min_learning_rate_ratio = 1.0  # constant after warm-up
    if arg != 'shapes_tiny':
        c.total_steps = total_steps
        c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, epoch_steps)
        c.eval_every_steps = epoch_steps
        c.checkpoint_every_steps = epoch_steps
        c.sample_every_steps = 0
    return c
