"""Speed and memory of one student step: the retain-while-acquire step against a plain step and the released code.

Variants, each a whole student step (``zero_grad`` + gradient + ``SGD.step``) on its own copy of the same student
(a timm model built with ``pretrained=False``), on the same batches: an acquisition batch ``x`` (64 by default) and a
memory batch ``x_m`` (8), with fixed random "teacher logits" as targets and the L1 loss on logits:

* ``plain``: the MB-DFKD joint step ``∇[L_Acq(θ) + L_Ret(θ)]``: two forwards, one backward of the sum.
* ``released``: a REPRODUCTION OF THE DEFECT in the paper's released step (``distill_knowledge_meta7`` of
  github.com/gaurav104/LRA): ``higher.innerloop_ctx`` with its default ``copy_initial_weights=True``, an inner step
  on L1 of the patched model, the memory loss on the patched model, plus a separate student forward on
  ``cat(x, x_m)``, backward of the sum. It pays for the second-order work, but the retention gradient only reaches
  the detached copies, never the student. It lives here only, as a timing reference.
* ``lrwa_higher``, ``lrwa_functional``: :class:`lrwa_plugin.meta.RetainWhileAcquire`, second order, each backend.
* ``lrwa_first``: the same, ``order='first'``, backend ``higher``.
* ``lrwa_fd``: the same, ``order='finite_difference'`` (``fd_eps`` 0.01), backend ``higher``: the Hessian-vector
  product from one extra gradient of L_Acq at ``θ + εv``, so its work is plain + 1 × (acquisition gradient).

Gradient quality: every variant's gradient on the same step, from a fresh copy of the student, against the exact
second-order gradient (backend functional): cosine similarity and relative error ``‖g − g_exact‖ / ‖g_exact‖``.
(``plain`` and ``released`` are other objectives; their rows say how far from the meta gradient they are.)

The variants run interleaved (one step of each, in an order rotated every round, then again) after a warm-up, so
that a change in the machine's load hits all of them alike; each is reported as the median over the rounds and as
a ratio to ``plain`` measured in this run, in wall time and in this process's CPU time (with one thread, the CPU time
is the work done, much less disturbed by other jobs on the machine than the wall time). Nothing is asserted on
timings.

Work: the floating-point operations of one step, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix
products and convolutions, forward, backward and double backward, which are all but a sliver of the arithmetic), one
untimed step per variant. Unlike the times, the counts do not depend on the machine or its load: a time ratio can
fall below the work ratio only as far as the kernels run one variant's operations faster than the other's. For the
exact second-order step the Hessian-vector product costs two gradients of L_Acq (``FlopCounterMode`` counts the same
for ``torch.func``'s forward-over-reverse ``jvp(grad(·))`` as for reverse-over-reverse), so its work is
plain + 2 × (acquisition gradient): 2.79× the plain step at the default sizes.

Memory: the peak of the tensor memory the step allocates, over what was allocated before it (model, optimizer state,
batches, gradients released by ``zero_grad(set_to_none=True)`` just before). It is measured by
``torch.profiler.profile(profile_memory=True)``, whose allocation and free events come from torch's CPU allocator
itself (every tensor byte, nothing else): one extra step per variant, after the timed ones, and the running sum of
its events' bytes in time order. (``tracemalloc`` would not see these allocations, and the process RSS mixes them
with the allocator's and the libraries' own pages.)

    python benchmarks/bench_meta_step.py                     # resnet18, 64 + 8 samples of 3x32x32, 20 rounds
    python benchmarks/bench_meta_step.py --ops               # and where the time goes, by convolution kernel
    python benchmarks/bench_meta_step.py --threads 2 --json  # one JSON object on stdout
    python benchmarks/bench_meta_step.py --hvp_modes         # and the work of a Hessian-vector product, both AD modes
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator

os.environ.setdefault('TORCH_CPP_LOG_LEVEL', 'ERROR')  # the profiler warns about frees of pre-existing tensors

import higher  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lrwa_plugin.meta import RetainWhileAcquire  # noqa: E402

VARIANTS = ('plain', 'released', 'lrwa_higher', 'lrwa_functional', 'lrwa_first', 'lrwa_fd')
DESCRIPTIONS = {
    'plain': 'joint step ∇[L_Acq(θ) + L_Ret(θ)] (mb_dfkd)',
    'released': "paper's released step (copy_initial_weights=True: L_Ret never reaches the student)",
    'lrwa_higher': 'lrwa, second order, backend higher',
    'lrwa_functional': 'lrwa, second order, backend functional',
    'lrwa_first': 'lrwa, first order, backend higher',
    'lrwa_fd': 'lrwa, finite-difference Hessian, backend higher',
}
ORDERS = {'lrwa_higher': 'second', 'lrwa_functional': 'second', 'lrwa_first': 'first', 'lrwa_fd': 'finite_difference'}
Step = Callable[[], None]


def get_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='resnet18', help='timm model name of the student')
    parser.add_argument('--num_classes', type=int, default=10)
    parser.add_argument('--img_size', type=int, default=32)
    parser.add_argument('--acq_batch', type=int, default=64, help='acquisition (generated) batch size')
    parser.add_argument('--mem_batch', type=int, default=8, help='memory (replay) batch size')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch intra-op threads (1 by default: on a shared, loaded machine two threads spin)')
    parser.add_argument('--steps', type=int, default=20, help='timed rounds (one step of every variant each)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds first')
    parser.add_argument('--alpha', type=float, default=0.9, help='inner step size α')
    parser.add_argument('--lr', type=float, default=0.01, help="student optimizer's learning rate")
    parser.add_argument('--fd_eps', type=float, default=0.01, help='fd_eps of the finite-difference variant')
    parser.add_argument('--variants', nargs='+', choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument('--no_memory', action='store_true', help='skip the memory measurement')
    parser.add_argument('--ops', action='store_true',
                        help='also profile one step per variant: calls and CPU time of the convolution kernels')
    parser.add_argument('--hvp_modes', action='store_true',
                        help='also count the work of one gradient of L_Acq and of one Hessian-vector product of '
                             'L_Acq, reverse-over-reverse and forward-over-reverse (torch.func)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
    return parser


def released_step(student: nn.Module, optimizer: torch.optim.Optimizer, batches: dict[str, torch.Tensor],
                  alpha: float) -> Step:
    """REPRODUCTION OF A DEFECT, for timing only: the step of the paper's released code (see the module docstring).

    ``higher.innerloop_ctx`` is called with its default ``copy_initial_weights=True``, as the released code does, so
    the fast weights start from detached copies and the memory loss on the patched model sends no gradient to the
    student. Never use this pattern for training; lrwa_plugin.meta is the correct step.
    """
    x, t, x_m, t_m = batches['x'], batches['t'], batches['x_m'], batches['t_m']
    x_cat, t_cat = torch.cat([x, x_m]), torch.cat([t, t_m])
    inner_optimizer = torch.optim.SGD(student.parameters(), lr=alpha, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        inner_optimizer.zero_grad(set_to_none=True)
        with higher.innerloop_ctx(student, inner_optimizer) as (fmodel, diffopt):  # the defect: default copy
            diffopt.step(F.l1_loss(fmodel(x), t))
            outer_loss = F.l1_loss(fmodel(x_m), t_m)
            joint_loss = F.l1_loss(student(x_cat), t_cat)
            (outer_loss + joint_loss).backward()
        optimizer.step()
    return step


def make_step(variant: str, student: nn.Module, optimizer: torch.optim.Optimizer, batches: dict[str, torch.Tensor],
              alpha: float, fd_eps: float = 0.01) -> Step:
    x, t, x_m, t_m = batches['x'], batches['t'], batches['x_m'], batches['t_m']
    if variant == 'released':
        return released_step(student, optimizer, batches, alpha)
    if variant == 'plain':
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            (F.l1_loss(student(x), t) + F.l1_loss(student(x_m), t_m)).backward()
            optimizer.step()
        return step
    backend = 'functional' if variant == 'lrwa_functional' else 'higher'
    meta = RetainWhileAcquire(alpha, backend=backend, order=ORDERS[variant], fd_eps=fd_eps)

    def acquire(model: Callable[..., torch.Tensor]) -> torch.Tensor:
        return F.l1_loss(model(x), t)

    def retain(model: Callable[..., torch.Tensor]) -> torch.Tensor:
        return F.l1_loss(model(x_m), t_m)

    def meta_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        meta(student, acquire, retain)
        optimizer.step()
    return meta_step


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silences the C++ profiler's start/stop chatter on file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, 'w') as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_step_bytes(step: Step, optimizer: torch.optim.Optimizer) -> int:
    """Peak tensor bytes allocated by one ``step`` over those held before it (see the module docstring)."""
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]' and e.device_type() == DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def counted(fn: Callable[[], object]) -> FlopCounterMode:
    """Runs ``fn`` once under a ``FlopCounterMode`` and returns the counter (matrix products and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter


def step_flops(step: Step, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Floating-point operations of one ``step`` (matrix products and convolutions; see the module docstring): the
    total, and those of convolution kernels and of convolution backward kernels (as :func:`op_breakdown` splits)."""
    optimizer.zero_grad(set_to_none=True)
    counter = counted(step)
    by_op = {str(op): count for op, count in counter.get_flop_counts()['Global'].items()}
    return {'total': counter.get_total_flops(), 'convolution': by_op.get('aten.convolution', 0),
            'convolution_backward': by_op.get('aten.convolution_backward', 0)}


def hvp_work(student: nn.Module, batches: dict[str, torch.Tensor]) -> dict[str, int]:
    """Operations of one gradient of L_Acq and of one Hessian-vector product H·v of L_Acq, computed both ways autodiff
    offers: reverse-over-reverse (backward of the ``create_graph`` backward, as both backends do) and
    forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``). Each H·v count excludes its gradient."""
    model = copy.deepcopy(student)
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    tangent = {name: torch.randn_like(p) for name, p in params.items()}

    def acquire(p: dict[str, torch.Tensor]) -> torch.Tensor:  # buffers are copies: torch.func may not mutate captures
        return F.l1_loss(torch.func.functional_call(model, (p, {k: b.clone() for k, b in buffers.items()}),
                                                    (batches['x'],)), batches['t'])

    def reverse_over_reverse() -> None:
        leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
        grads = torch.autograd.grad(acquire(leaves), list(leaves.values()), create_graph=True)
        torch.autograd.grad(grads, list(leaves.values()), grad_outputs=list(tangent.values()))

    gradient = counted(lambda: torch.func.grad(acquire)(params)).get_total_flops()
    with warnings.catch_warnings():  # torch's forward-mode AD scripts its own decompositions on first use
        warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
        forward_over_reverse = counted(lambda: torch.func.jvp(torch.func.grad(acquire), (params,), (tangent,)))
    return {'gradient': gradient,
            'hvp_reverse_over_reverse': counted(reverse_over_reverse).get_total_flops() - gradient,
            'hvp_forward_over_reverse': forward_over_reverse.get_total_flops() - gradient}


def op_breakdown(step: Step, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One profiled step: calls and self CPU seconds of convolutions (forward kernels, also those run inside a
    double backward), of convolution backward kernels, and of everything else."""
    optimizer.zero_grad(set_to_none=True)
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    out = {'conv_calls': 0, 'conv_s': 0.0, 'conv_backward_calls': 0, 'conv_backward_s': 0.0, 'total_s': 0.0}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        out['total_s'] += seconds
        if event.key == 'aten::convolution_backward':
            out['conv_backward_calls'] += event.count
            out['conv_backward_s'] += seconds
        elif 'convolution' in event.key:
            out['conv_s'] += seconds
            out['conv_calls'] += event.count if event.key == 'aten::_convolution' else 0
    out['other_s'] = out['total_s'] - out['conv_s'] - out['conv_backward_s']
    return out


def step_gradient(variant: str, student: nn.Module, batches: dict[str, torch.Tensor], alpha: float,
                  fd_eps: float) -> torch.Tensor:
    """The gradient ``variant``'s step leaves in ``.grad`` of a fresh copy of the student (flattened)."""
    model = copy.deepcopy(student)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step computes the gradient, moves nothing
    make_step(variant, model, optimizer, batches, alpha, fd_eps)()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()  # float64: cosines near 1


def gradient_quality(variants: list[str], student: nn.Module, batches: dict[str, torch.Tensor], alpha: float,
                     fd_eps: float) -> dict[str, dict[str, float]]:
    """Each variant's gradient against the exact second-order one (functional backend) on the same step."""
    exact = step_gradient('lrwa_functional', student, batches, alpha, fd_eps)
    quality = {}
    for variant in variants:
        g = exact if variant == 'lrwa_functional' else step_gradient(variant, student, batches, alpha, fd_eps)
        quality[variant] = {'cosine': float(F.cosine_similarity(g, exact, dim=0)),
                            'rel_error': float((g - exact).norm() / exact.norm())}
    return quality


def main(argv: list[str] | None = None) -> int:
    args = get_argparser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    student = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes).train()
    shape = (3, args.img_size, args.img_size)
    batches = {'x': torch.randn(args.acq_batch, *shape), 't': torch.randn(args.acq_batch, args.num_classes),
               'x_m': torch.randn(args.mem_batch, *shape), 't_m': torch.randn(args.mem_batch, args.num_classes)}
    quality = gradient_quality(list(args.variants), student, batches, args.alpha, args.fd_eps)
    agreement = quality['lrwa_higher']['rel_error'] if 'lrwa_higher' in quality else None

    steps, optimizers = {}, {}
    for variant in args.variants:
        model = copy.deepcopy(student)
        optimizers[variant] = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        steps[variant] = make_step(variant, model, optimizers[variant], batches, args.alpha, args.fd_eps)

    times: dict[str, list[float]] = {variant: [] for variant in args.variants}
    cpu_times: dict[str, list[float]] = {variant: [] for variant in args.variants}
    order = list(args.variants)
    for round_index in range(args.warmup + args.steps):
        for variant in order:
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[variant]()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if round_index >= args.warmup:
                times[variant].append(elapsed)
                cpu_times[variant].append(elapsed_cpu)
        order = order[1:] + order[:1]

    flop_counts = {v: step_flops(steps[v], optimizers[v]) for v in args.variants}
    flops = {v: counts['total'] for v, counts in flop_counts.items()}
    peaks = {} if args.no_memory else {v: peak_step_bytes(steps[v], optimizers[v]) for v in args.variants}
    hvp = hvp_work(student, batches) if args.hvp_modes else {}
    ops = {v: op_breakdown(steps[v], optimizers[v]) for v in args.variants} if args.ops else {}
    medians = {v: statistics.median(times[v]) for v in args.variants}
    cpu = {v: statistics.median(cpu_times[v]) for v in args.variants}
    base = 'plain' if 'plain' in medians else args.variants[0]
    result = {
        'variants': {v: {'median_s': medians[v], 'ratio_to_' + base: medians[v] / medians[base],
                         'median_cpu_s': cpu[v], 'cpu_ratio_to_' + base: cpu[v] / cpu[base],
                         'flops': flops[v], 'flops_ratio_to_' + base: flops[v] / flops[base],
                         'flops_by_kernel': flop_counts[v],
                         'peak_bytes': peaks.get(v),
                         'peak_ratio_to_' + base: peaks[v] / peaks[base] if peaks else None,
                         'grad_cosine_to_exact': quality[v]['cosine'],
                         'grad_rel_error_to_exact': quality[v]['rel_error'],
                         'times_s': times[v], 'cpu_times_s': cpu_times[v], 'description': DESCRIPTIONS[v],
                         **({'ops': ops[v]} if ops else {})}
                     for v in args.variants},
        'settings': {'model': args.model, 'num_classes': args.num_classes, 'input': list(shape),
                     'acq_batch': args.acq_batch, 'mem_batch': args.mem_batch, 'alpha': args.alpha,
                     'fd_eps': args.fd_eps, 'exact_gradient': 'lrwa second order, backend functional',
                     'threads': torch.get_num_threads(), 'steps': args.steps, 'warmup': args.warmup,
                     'torch': torch.__version__, 'higher': getattr(higher, '__version__', 'unknown'),
                     'flop_counter': 'torch.utils.flop_counter.FlopCounterMode, one step',
                     'memory_tool': 'torch.profiler profile_memory=True (CPU allocator events), peak over one step',
                     'grad_rel_diff_higher_vs_functional': agreement},
        **({'hvp_flops': hvp} if hvp else {}),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f'{args.model} ({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters), acquisition '
          f'{args.acq_batch} + memory {args.mem_batch} samples of {"x".join(map(str, shape))}, '
          f'{torch.get_num_threads()} thread(s), median of {args.steps} interleaved rounds after {args.warmup} '
          f'warm-up; torch {torch.__version__}')
    print(f'{"variant":<16} {"wall ms":>8} {"× " + base:>7} {"CPU ms":>8} {"× " + base:>7} {"GFLOP":>6} '
          f'{"× " + base:>7} {"peak MiB":>8} {"× " + base:>7} {"cos":>7} {"rel err":>8}  what')
    for v in args.variants:
        peak = '' if not peaks else f'{peaks[v] / 2**20:8.1f} {peaks[v] / peaks[base]:7.2f}'
        print(f'{v:<16} {medians[v] * 1e3:8.1f} {medians[v] / medians[base]:7.2f} {cpu[v] * 1e3:8.1f} '
              f'{cpu[v] / cpu[base]:7.2f} {flops[v] / 1e9:6.2f} {flops[v] / flops[base]:7.2f} {peak:>16} '
              f'{quality[v]["cosine"]:7.4f} {quality[v]["rel_error"]:8.2e}  {DESCRIPTIONS[v]}')
    print('wall: perf_counter; CPU: process_time (this process only: steadier than wall time on a shared machine)')
    print('GFLOP: one step counted by torch.utils.flop_counter.FlopCounterMode (the work; machine-independent)')
    if peaks:
        print('peak: tensor bytes allocated during one step over those held before it (torch.profiler, '
              'profile_memory)')
    print("cos, rel err: the step's gradient against the exact second-order one (functional) on the same step: "
          'cosine similarity, ‖g − g_exact‖ / ‖g_exact‖')
    if hvp:
        print(f'\nL_Acq on the acquisition batch: gradient {hvp["gradient"] / 1e9:.2f} GFLOP; Hessian-vector product '
              f'on top of it {hvp["hvp_reverse_over_reverse"] / 1e9:.2f} GFLOP reverse-over-reverse, '
              f'{hvp["hvp_forward_over_reverse"] / 1e9:.2f} GFLOP forward-over-reverse '
              f'(× gradient: {hvp["hvp_reverse_over_reverse"] / hvp["gradient"]:.2f}, '
              f'{hvp["hvp_forward_over_reverse"] / hvp["gradient"]:.2f})')
    if ops:
        print('\none profiled step (self CPU time):')
        print(f'{"variant":<16} {"convs":>6} {"conv ms":>8} {"GFLOP/s":>8} {"conv bwd":>9} {"bwd ms":>8} '
              f'{"GFLOP/s":>8} {"other ms":>9} {"total ms":>9}')
        for v in args.variants:
            o, counts = ops[v], flop_counts[v]
            print(f'{v:<16} {o["conv_calls"]:6d} {o["conv_s"] * 1e3:8.1f} '
                  f'{counts["convolution"] / o["conv_s"] / 1e9:8.1f} {o["conv_backward_calls"]:9d} '
                  f'{o["conv_backward_s"] * 1e3:8.1f} '
                  f'{counts["convolution_backward"] / o["conv_backward_s"] / 1e9:8.1f} '
                  f'{o["other_s"] * 1e3:9.1f} {o["total_s"] * 1e3:9.1f}')
        print('convs: convolution kernels run as such (forwards, and inside the double backward of a convolution); '
              'conv bwd: convolution backward kernels (input and weight gradients); GFLOP/s: their counted '
              'operations over their self CPU time')
    return 0


if __name__ == '__main__':
    sys.exit(main())
