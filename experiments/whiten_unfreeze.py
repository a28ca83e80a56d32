"""whiten_unfreeze.py: does letting the whitening conv's weights train late in training help?

    python experiments/whiten_unfreeze.py --runs 2 --unfreeze-epoch 5 --data-dir cifar10

The baseline is airbench94 unchanged (whitening weights frozen throughout). The variant unfreezes
them at the start of --unfreeze-epoch (0-based), in a parameter group of their own whose lr is
--whiten-lr-scale times the other weights' (same decay per step, same schedule). Whether they are
trainable is logged per epoch.
"""
import harness


def unfreeze_whitening_from(start_epoch, lr_scale):
    """An on_epoch_start hook: from `start_epoch` on, the whitening weights train in their own group."""
    def hook(epoch, net, optimizer, opt):
        weight = net.whiten.weight
        if epoch >= start_epoch and not weight.requires_grad:
            weight.requires_grad = True
            others = optimizer.param_groups[-1]  # the non-BatchNorm-bias weights (see make_optimizer)
            lr = others['initial_lr'] * lr_scale
            decay = others['weight_decay'] * others['initial_lr']  # decay per step, kept as lr * wd
            optimizer.add_param_group(dict(params=[weight], lr=lr, initial_lr=lr, weight_decay=decay / lr))
        return {'whiten_trainable': weight.requires_grad}
    return hook


def main(argv=None):
    def extra(parser):
        parser.add_argument('--unfreeze-epoch', type=int, default=5,
                            help='first epoch (0-based) whose steps train the whitening weights (default: %(default)s)')
        parser.add_argument('--whiten-lr-scale', type=float, default=1.0,
                            help="their lr, relative to the other weights' (default: %(default)s)")
    args = harness.parse_args(__doc__.split('\n\n')[0], argv, baseline_is_airbench94=True, extra=extra)
    if args.unfreeze_epoch < 0 or not args.whiten_lr_scale > 0:
        raise SystemExit('whiten_unfreeze.py: error: --unfreeze-epoch must be >= 0 and --whiten-lr-scale > 0')
    train, test = harness.loaders(args)

    def frozen(epoch, net, optimizer, opt):
        return {'whiten_trainable': net.whiten.weight.requires_grad}

    unfreeze = unfreeze_whitening_from(args.unfreeze_epoch, args.whiten_lr_scale)
    arms = {'whitening frozen (airbench94)':
            lambda seed: harness.train_run(args, train, test, seed, epoch_fields=frozen),
            f'unfrozen from epoch {args.unfreeze_epoch}':
            lambda seed: harness.train_run(args, train, test, seed, epoch_fields=unfreeze)}
    return harness.run_study('whiten_unfreeze', 'whitening weights unfrozen late vs frozen', args, arms)


if __name__ == '__main__':
    main()
