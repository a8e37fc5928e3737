"""Virtual detectors, centre of mass and summed diffraction pattern in one pass over the events.

:class:`FusedStreaming` wraps already-configured :class:`~operators.virtual.VirtualDetectors`,
:class:`~operators.com.CenterOfMass` and :class:`~operators.diffraction.DiffractionSum`
operators and computes all their states in a single numba loop: each event's pixel is looked
up once in a per-pixel table (which mask combination it belongs to, whether it is inside the
centre-of-mass radius; with a summed pattern, the pixel's electrons of the chunk too), and its
y and x are added to the centre-of-mass sums. ``finalize`` hands the state to the wrapped
operators' own ``finalize``, so result names, dtypes, units, attrs and values are exactly theirs.

Examples
--------
>>> import numpy as np
>>> from operators.virtual import VirtualDetectors, annulus_mask
>>> from operators.com import CenterOfMass
>>> from operators.diffraction import DiffractionSum
>>> from operators.fused import FusedStreaming
>>> frame_shape, scan_shape = (32, 40), (7, 9)
>>> vd = VirtualDetectors(np.stack([annulus_mask(frame_shape, outer=6),
...                                 annulus_mask(frame_shape, inner=8, outer=15)]),
...                       ["bf", "adf"], scan_shape)
>>> op = FusedStreaming(vd, CenterOfMass(scan_shape, frame_shape, radius=7),
...                     DiffractionSum(frame_shape))
>>> state = op.new_state()                   # then op.process(state, chunk) per chunk
>>> sorted(op.finalize(state))[:3]
['adf', 'bf', 'com_n']
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from operators.base import Operator, Result, State
from operators.chunk import Chunk
from operators.kernels import NJIT, raise_if_bad

# Pixel classes (mask combinations x inside the CoM radius) are numbered in a uint8 code.
MAX_CODES = 256
# Up to this many codes, a frame's per-code counts are packed into one 64-bit register
# (64 // n_codes bits each) instead of a histogram in memory.
MAX_PACKED = 8
# The cells (uint16 per pixel, used with a summed pattern): the pixel's class field in the low
# bits (packed path: its counter's bit offset, < 64; histogram path: its class, < 256), the
# electrons of the current call above, which overflow into the int64 total every 1024 (256).
PACKED_BITS = 6
HIST_BITS = 8
# Events ahead whose pixels of the int64 summed pattern are prefetched when a chunk is counted
# into it directly (fewer events than pixels): they land anywhere in an array larger than an L2
# cache (2.6 MB at 576 x 576). 32 was the fastest of 0, 16, 24, 32, 48, 64 on unsorted
# 4-sector events (benchmarks/bench_fused.py).
PREFETCH_AHEAD = 32


def _prefetch_codegen(context, builder, signature, args):
    aryty = signature.args[0]
    ary = context.make_array(aryty)(context, builder, args[0])
    ptr = builder.gep(ary.data, [args[1]])
    try:  # LLVM >= 15 (opaque pointers)
        ptr_t, fname = ir.PointerType(), "llvm.prefetch.p0"
    except TypeError:
        ptr_t, fname = ir.IntType(8).as_pointer(), "llvm.prefetch.p0i8"
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [ptr_t, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, fname)
    # (address, rw=1 write, locality=3 keep in all caches, cache type=1 data)
    builder.call(fn, [builder.bitcast(ptr, ptr_t), i32(1), i32(3), i32(1)])
    return context.get_dummy_value()


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Ask the CPU to bring ``arr[idx]`` into the caches for writing. A hint: never faults,
    no bounds check, no effect on results."""
    if isinstance(arr, types.Array) and isinstance(idx, types.Integer):
        return types.void(arr, idx), _prefetch_codegen
    return None



def _division_magic(n_pix, w):
    """(M, s) with (idx * M) >> s == idx // w for every 0 <= idx < n_pix < 2**31 (uint64)."""
    n_bits = max(1, int(n_pix - 1).bit_length())
    s = n_bits + max(0, int(w - 1).bit_length())
    m = -(-(1 << s) // w)  # ceil: M w - 2**s < w <= 2**(s - n_bits), so the error never
    return np.uint64(m), np.uint64(s)  # reaches the next integer (Granlund & Montgomery 1994)


@njit(inline="always", **NJIT)
def _packed_run(indices, a, stop, pf_end, table, cells, use_cells, inside_shift, m, s, total,
                com, all_in):
    """Events a..stop (all pixel indices valid, stop - a < 2**bits): per-class counts packed
    in one register, CoM sums of the classes inside the radius (of every event if ``all_in``
    is not None; ``com``, ``all_in``, ``total`` and ``cells`` are None or not at compile
    time). The class field of a pixel is the bit offset of its class's counter (class x
    bits). Returns (packed counts, sum y, sum idx)."""
    acc = np.uint64(0)
    cy = np.uint64(0)
    ci = np.uint64(0)
    one = np.uint64(1)
    cmask = np.uint16((1 << PACKED_BITS) - 1)
    inc = np.uint16(1 << PACKED_BITS)
    rest = a
    if total is not None and not (cells is not None and use_cells) and stop <= pf_end:
        # Counting into the total, every event's prefetch within the chunk: the same work
        # without the test per event (10 % at 100 e-/frame, unsorted 4-sector events).
        rest = stop
        for e in range(a, stop):
            idx = np.uint64(indices[e])
            _prefetch(total, np.uint64(indices[e + np.uint64(PREFETCH_AHEAD)]))
            v = np.uint16(table[idx])
            total[idx] += 1
            sh = v & cmask
            acc += one << np.uint64(sh)
            if com is not None and all_in is None:
                f = np.uint64(sh < inside_shift)
                cy += f * ((idx * m) >> s)
                ci += f * idx
    for e in range(rest, stop):
        idx = np.uint64(indices[e])
        # (written out here and in _hist_run: as a function, even inlined, numba increfs the
        # arrays at every event, 6x slower)
        if cells is not None and use_cells:
            v = cells[idx]
        else:
            if total is not None and e < pf_end:
                _prefetch(total, np.uint64(indices[e + np.uint64(PREFETCH_AHEAD)]))
            v = np.uint16(table[idx])
        if cells is not None and use_cells:
            nv = np.uint16(v + inc)  # (numba widens uint16 sums: wrap it here)
            cells[idx] = nv
            if nv < inc:  # the count wrapped: its 2**(16 - PACKED_BITS) go to the total now
                total[idx] += 1 << (16 - PACKED_BITS)
        elif total is not None:
            total[idx] += 1
        sh = v & cmask
        acc += one << np.uint64(sh)
        if com is not None and all_in is None:
            f = np.uint64(sh < inside_shift)
            cy += f * ((idx * m) >> s)
            ci += f * idx
    if com is not None and all_in is not None:
        # The CoM of every event in a second pass over the run (its indices still in L1): a
        # loop the compiler vectorises, and the first loop has fewer values to hold in
        # registers (with these sums in it, it reloaded more spilled ones at every event).
        # 16-19 % faster at 1000 e-/frame, 0-7 % at 100, on unsorted 4-sector events.
        for e in range(a, stop):
            idx = np.uint64(indices[e])
            cy += (idx * m) >> s
            ci += idx
    return acc, cy, ci


@njit(inline="always", **NJIT)
def _hist_run(indices, a, stop, pf_end, table, cells, use_cells, hist, n_inside, m, s, total,
              com):
    """As _packed_run for many codes (the class field is the code): counts into hist
    (2, n_codes), alternating rows, since consecutive events of a sorted frame mostly share
    a code and incrementing one counter twice in a row waits on store-to-load forwarding."""
    cy = np.uint64(0)
    ci = np.uint64(0)
    one = np.uint64(1)
    cmask = np.uint16((1 << HIST_BITS) - 1)
    inc = np.uint16(1 << HIST_BITS)
    for e in range(a, stop):
        idx = np.uint64(indices[e])
        if cells is not None and use_cells:
            v = cells[idx]
        else:
            if total is not None and e < pf_end:
                _prefetch(total, np.uint64(indices[e + np.uint64(PREFETCH_AHEAD)]))
            v = np.uint16(table[idx])
        if cells is not None and use_cells:
            nv = np.uint16(v + inc)
            cells[idx] = nv
            if nv < inc:
                total[idx] += 1 << (16 - HIST_BITS)
        elif total is not None:
            total[idx] += 1
        c = v & cmask
        hist[e & one, c] += 1
        if com is not None:
            f = np.uint64(c < n_inside)
            cy += f * ((idx * m) >> s)
            ci += f * idx
    return cy, ci


@njit(inline="always", **NJIT)
def _checked_run(indices, a, stop, code, hist, n_inside, m, s, total, com):
    """Slow path for a frame holding out-of-range pixel indices: skip and count them."""
    n_pix = np.uint64(code.shape[0])
    cy = np.uint64(0)
    ci = np.uint64(0)
    bad = 0
    for e in range(a, stop):
        idx = np.uint64(indices[e])
        if idx >= n_pix:
            bad += 1
            continue
        c = code[idx]
        hist[0, c] += 1
        if total is not None:
            total[idx] += 1
        if com is not None and c < n_inside:
            cy += (idx * m) >> s
            ci += idx
    return cy, ci, bad


@njit(**NJIT)
def fold_cells(cells, cbits, total):
    """Move the counts of ``cells`` (above the low ``cbits`` bits of each) into ``total``
    and zero them, keeping the low bits: one vectorised pass over every pixel."""
    cmask = np.uint16((1 << cbits) - 1)
    cb = np.uint16(cbits)
    for j in range(np.uint64(cells.shape[0])):
        v = cells[j]
        total[j] += v >> cb
        cells[j] = v & cmask


@njit(**NJIT)
def _fused_kernel(positions, offsets, indices, n_pos, code, n_inside, cptr, crow, cweight,
                  g_row, g_field, g_weight, m, s, uw, images, n, sy, sx, total, table, cells,
                  all_in):
    """One pass over the events of the non-flyback frames of a chunk.

    code (n_pix,) uint8: per pixel its class; classes < n_inside are inside the CoM radius.
    table (n_pix,) uint8: per pixel its class field: its class with more than MAX_PACKED
    classes (a histogram), else its bit offset in a packed counter (class x bits).
    cells (n_pix,) uint16 or None: with a summed pattern, the same field in the low
    PACKED_BITS (HIST_BITS) bits and above it the pixel's count in this call (zero on entry,
    zero again on return: :func:`fold_cells`), so that the pattern's random increments stay
    in a table a quarter the size of ``total`` (int64), which a core's L2 cache holds. Used
    for chunks of at least one event per pixel; smaller ones count into ``total`` directly
    (the fold, a pass over every pixel, would cost more than it saves).
    cptr, crow, cweight: per class, the (image row, fixed-point weight) pairs it adds to.
    g_row, g_field, g_weight: the same as groups: image row g_row[g] adds g_weight[g] times
    the events of the classes whose packed fields g_field[g] (uint64 mask) covers; g_field
    is None with more than MAX_PACKED classes (then counted in a histogram).
    m, s: (idx * m) >> s == idx // w, w = uw the detector width (uint64).
    images (K, n_pos) int64; n, sy, sx (n_pos,) int64 or all None (no CoM); total (n_pix,)
    int64 or None (no summed pattern); all updated in place. all_in: n if every class is
    inside the CoM radius (no per-event test), else None.
    g_field, total, n and all_in being None or not selects the compiled variant, so that
    each variant's event loop holds only its own work.
    Returns (events with a pixel index >= n_pix, frames with a position >= n_pos).
    """
    n_pix = code.shape[0]
    n_codes = cptr.shape[0] - 1
    # Packed counts: a field of `bits` bits per code, unpacked at least every `block` events
    # so that no field overflows; the sum of all fields then fits in one field too, which
    # sums a group of fields with one multiply: ((acc & fields) * ones) >> top.
    bits = min(64 // n_codes, 32)
    block = np.uint64((1 << bits) - 1)
    ones = np.uint64(0)
    for c in range(n_codes):
        ones |= np.uint64(1) << np.uint64(bits * c)
    top = np.uint64(bits * (n_codes - 1))
    inside_field = np.uint64(0)
    for c in range(min(n_inside, n_codes)):
        inside_field |= block << np.uint64(bits * c)
    inside_shift = np.uint8(min(n_inside * bits, 255))
    n_groups = g_row.shape[0]
    hist = np.zeros((2, n_codes), dtype=np.int64)
    u_inside = np.uint8(n_inside)
    n_ev = indices.shape[0]
    pf_end = np.uint64(max(n_ev - PREFETCH_AHEAD, 0))
    # The cells pay for their fold (a pass over every pixel) from about one event per pixel
    # (at 100 e-/frame, 0.3 per pixel in a chunk, counting into the int64 total directly was
    # 12 % faster; at 1000, 3 per pixel, the cells 5-8 %: benchmarks/bench_fused.py).
    use_cells = total is not None and n_ev >= n_pix
    # One vectorised look at the chunk's largest index lets the event loops trust them all;
    # only a chunk holding a bad one looks frame by frame.
    mx = np.uint32(0)
    for e in range(np.uint64(n_ev)):  # (unsigned: contiguous vector loads, not gathers)
        mx = max(mx, indices[e])
    checked = np.int64(mx) >= n_pix
    bad_ev = 0
    bad_fr = 0
    for i in range(positions.shape[0]):
        p = positions[i]
        if p < 0:
            continue
        if p >= n_pos:
            bad_fr += 1
            continue
        a = np.uint64(offsets[i])
        b = np.uint64(offsets[i + 1])
        cy = np.uint64(0)
        ci = np.uint64(0)
        bad_frame = False
        if checked:
            fmx = np.uint32(0)
            for e in range(a, b):
                fmx = max(fmx, indices[e])
            bad_frame = np.int64(fmx) >= n_pix
        if bad_frame:
            cy, ci, bad = _checked_run(indices, a, b, code, hist, u_inside, m, s, total, n)
            bad_ev += bad
        elif g_field is not None:
            cn = np.uint64(0)
            if total is None and all_in is not None and n_groups == 0:
                # The CoM alone, of every event: no class to look up, and its sums in a loop
                # over contiguous indices the compiler vectorises (with other tasks,
                # _packed_run runs the same loop after theirs).
                for e in range(a, b):
                    idx = np.uint64(indices[e])
                    cy += (idx * m) >> s
                    ci += idx
                cn = b - a
                a = b
            while a < b:
                stop = min(b, a + block)
                acc, y1, i1 = _packed_run(indices, a, stop, pf_end, table, cells, use_cells,
                                          inside_shift, m, s, total, n, all_in)
                cy += y1
                ci += i1
                for g in range(n_groups):
                    cnt = (((acc & g_field[g]) * ones) >> top) & block
                    images[g_row[g], p] += np.int64(cnt) * g_weight[g]
                if all_in is None:
                    cn += (((acc & inside_field) * ones) >> top) & block
                else:
                    cn += stop - a
                a = stop
            if n is not None:
                n[p] += np.int64(cn)
                sy[p] += np.int64(cy)
                sx[p] += np.int64(ci - cy * uw)
            continue
        else:
            cy, ci = _hist_run(indices, a, b, pf_end, table, cells, use_cells, hist, u_inside,
                               m, s, total, n)
        cn = np.int64(0)
        for c in range(n_codes):
            # Branch-free: whether a code occurs in a frame is as good as random.
            cnt = hist[0, c] + hist[1, c]
            cn += cnt * (c < n_inside)
            for t in range(cptr[c], cptr[c + 1]):
                images[crow[t], p] += cnt * cweight[t]
            hist[0, c] = 0
            hist[1, c] = 0
        if n is not None:
            n[p] += cn
            sy[p] += np.int64(cy)
            # sum of x = sum of (idx - y w): one multiply per frame instead of per event.
            sx[p] += np.int64(ci - cy * uw)
    if total is not None and use_cells:
        fold_cells(cells, PACKED_BITS if g_field is not None else HIST_BITS, total)
    return bad_ev, bad_fr


def _as_list(virtual):
    if virtual is None:
        return []
    if getattr(virtual, "fused_role", None) == "virtual":
        return [virtual]
    return list(virtual)


class FusedStreaming(Operator):
    """Virtual detectors, centre of mass and summed pattern computed in one pass per chunk.

    Parameters
    ----------
    virtual : VirtualDetectors, a sequence of them, or None. Each must use the "combos"
        kernel (``op.kernel``: disks, annuli, segments, piecewise-constant weights), and
        together with the CoM radius they must split the detector into at most 256 classes
        of pixels.
    com : CenterOfMass or None.
    diffraction : DiffractionSum or None.
    name : operator name (the key of its state in a pipeline); must differ from the others.

    Notes
    -----
    The wrapped operators define the configuration and the results: ``finalize`` returns
    exactly what their own ``finalize`` returns for the same events (same names, dtypes,
    units, attrs, values, bit for bit), and they are never asked to ``process``.
    State: ``images`` (K, ny*nx) int64 (the ``images`` of every virtual operator stacked in
    order), ``n``, ``sum_y``, ``sum_x`` (ny*nx,) int64 with a CoM, ``sum`` (h*w,) int64 with
    a diffraction sum; :meth:`split_state` gives each wrapped operator its own state.

    Per event: one lookup of the pixel's class (mask combination and inside the CoM radius
    or not), one count of the class (in a register while there are at most 8 classes,
    ``self.n_codes``), the CoM sums, and with a summed pattern one increment of the pixel:
    in a chunk of at least one event per detector pixel, of its cell, a uint16 per pixel
    holding its class in the low bits and its electrons of the chunk above (0.66 MB at
    576 x 576, in a core's L2 cache where the int64 pattern, 2.6 MB, is not; a count that
    wraps adds its 1024, or 256 with more than 8 classes, to the pattern at once, and every
    cell's count is added to it at the end of ``process``, so the state is exact after every
    call); in a smaller chunk, of the int64 pattern itself, 32 events ahead prefetched. Per
    frame the class counts are expanded into the k images and the CoM count.

    Out-of-range input raises ValueError after the rest of the chunk was accumulated, as in
    the separate operators; one difference: with a virtual detector or a CoM, frames at
    positions beyond the scan are left out of the summed pattern too (a DiffractionSum
    without ``n_positions`` alone would have added them before raising).

    See Also
    --------
    fuse_operators : put a FusedStreaming in place of a pipeline's fusable operators.
    """

    def __init__(self, virtual=None, com=None, diffraction=None, name="fused"):
        self.name = name
        self.label = f"FusedStreaming {name!r}"  # who errors name
        self.virtual = _as_list(virtual)
        self.com = com
        self.diffraction = diffraction
        what = f"FusedStreaming {name!r}"
        for v in self.virtual:
            if getattr(v, "fused_role", None) != "virtual":
                raise ValueError(f"{what}: virtual must be VirtualDetectors operators, got "
                                 f"{type(v).__name__}")
            if v.kernel != "combos":
                raise ValueError(f"{what}: VirtualDetectors {v.name!r} uses the {v.kernel!r} "
                                 f"kernel (its masks have more than the 64 distinct pixel "
                                 f"combinations fusing needs); keep it as a separate operator")
        if com is not None and getattr(com, "fused_role", None) != "com":
            raise ValueError(f"{what}: com must be a CenterOfMass, got {type(com).__name__}")
        if diffraction is not None and getattr(diffraction, "fused_role", None) != "diffraction":
            raise ValueError(f"{what}: diffraction must be a DiffractionSum, got "
                             f"{type(diffraction).__name__}")
        parts = self.parts
        if not parts:
            raise ValueError(f"{what}: nothing to fuse; give virtual, com or diffraction")
        names = [p.name for p in parts] + [name]
        if len(set(names)) != len(names):
            raise ValueError(f"{what}: operator names must be distinct, got {names}")
        frame_shapes = {tuple(p.frame_shape) for p in parts}
        if len(frame_shapes) != 1:
            raise ValueError(f"{what}: the operators disagree on the detector shape: "
                             f"{sorted(frame_shapes)}; build them for the same detector")
        self.frame_shape = frame_shapes.pop()
        scan_shapes = {tuple(p.scan_shape) for p in parts if p.fused_role != "diffraction"}
        if len(scan_shapes) > 1:
            raise ValueError(f"{what}: the operators disagree on the scan shape: "
                             f"{sorted(scan_shapes)}; build them for the same scan")
        self.scan_shape = scan_shapes.pop() if scan_shapes else None
        self.n_pixels = self.frame_shape[0] * self.frame_shape[1]
        limits = [] if self.scan_shape is None else [self.scan_shape[0] * self.scan_shape[1]]
        if diffraction is not None:
            limits.append(diffraction.n_positions)
        self._n_pos = np.int64(min(limits))
        self._rows = np.cumsum([0] + [v.k for v in self.virtual])
        if self.n_pixels > 2**31:
            raise ValueError(f"{what}: detectors of more than 2**31 pixels are not supported "
                             f"({self.frame_shape}); use the separate operators")
        self._magic = _division_magic(self.n_pixels, self.frame_shape[1])
        self._no_images = np.zeros((0, 0), dtype=np.int64)
        self._build_codes()
        self.state_kinds = {}
        if self.virtual:
            self.state_kinds["images"] = "nav"
        if com is not None:
            self.state_kinds.update(n="nav", sum_y="nav", sum_x="nav")
        if diffraction is not None:
            self.state_kinds["sum"] = "sig"

    @property
    def parts(self) -> list[Operator]:
        """The wrapped operators, in the order their results are returned."""
        return self.virtual + [p for p in (self.com, self.diffraction) if p is not None]

    def _build_codes(self):
        """Per pixel a uint8 code: its class, i.e. its (inside the CoM radius, combination of
        each virtual operator) tuple, numbered with the classes inside the radius first. Per
        class, the (image row, fixed-point weight) pairs it adds to."""
        outside = (np.zeros(self.n_pixels, np.int64) if self.com is None
                   else 1 - self.com._inside.astype(np.int64))
        # Mixed-radix key, compacted after each operator so that it never overflows.
        key = outside
        for v in self.virtual:
            radix = len(v._cptr) - 1
            _, key = _dense_rank(key * radix + v._label)
        n_codes, code = _dense_rank(key)
        if n_codes > MAX_CODES:
            raise ValueError(f"FusedStreaming {self.name!r}: the virtual detectors and the CoM "
                             f"radius split the detector into {n_codes} classes of pixels, more "
                             f"than {MAX_CODES}; fuse fewer of them and keep the rest as "
                             f"separate operators")
        # One representative pixel per class gives its membership in every operator.
        first = np.zeros(n_codes, dtype=np.int64)
        first[code] = np.arange(self.n_pixels)
        self._code = code.reshape(-1).astype(np.uint8)
        self.n_inside = int(np.count_nonzero(outside[first] == 0)) if self.com is not None else 0
        rows, weights, ptr = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [0]
        for c in range(n_codes):
            for m, v in enumerate(self.virtual):
                lab = v._label[first[c]]
                sl = slice(v._cptr[lab], v._cptr[lab + 1])
                rows.append(self._rows[m] + v._cmask[sl])
                weights.append(v._cweight[sl])
            ptr.append(sum(len(r) for r in rows))
        self._cptr = np.asarray(ptr, dtype=np.int64)
        self._crow = np.concatenate(rows).astype(np.int64)
        self._cweight = np.concatenate(weights).astype(np.int64)
        self.n_codes = n_codes
        # The packed path (at most MAX_PACKED classes): per pixel the bit offset of its
        # class's counter field, and the image updates as groups of fields of one weight.
        bits = min(64 // n_codes, 32)
        packed = n_codes <= MAX_PACKED
        field = self._code * np.uint8(bits) if packed else self._code
        self._table = field.astype(np.uint8)
        groups: dict[tuple[int, int], int] = {}
        for c in range(n_codes if packed else 0):
            for t in range(self._cptr[c], self._cptr[c + 1]):
                key = (int(self._crow[t]), int(self._cweight[t]))
                groups[key] = groups.get(key, 0) | (((1 << bits) - 1) << (bits * c))
        self._g_row = np.array([k[0] for k in groups], dtype=np.int64)
        self._g_weight = np.array([k[1] for k in groups], dtype=np.int64)
        self._g_field = np.array(list(groups.values()), dtype=np.uint64) if packed else None
        # With a summed pattern the event loop reads the cells instead (uint16: the class
        # field in the low cbits bits, the call's counts above; a field of 0 to 8 bits).
        self._cells = self._table.astype(np.uint16) if self.diffraction is not None else None
        self._cells_free: list[np.ndarray] = []
        self._kernel_args = (self._n_pos, self._code, self.n_inside, self._cptr, self._crow,
                             self._cweight, self._g_row, self._g_field, self._g_weight,
                             self._magic[0], self._magic[1], np.uint64(self.frame_shape[1]))

    def __getstate__(self):  # the cells in use stay behind when the operator travels
        return {**self.__dict__, "_cells_free": []}

    def new_state(self) -> State:
        state = {}
        n_pos = 0 if self.scan_shape is None else self.scan_shape[0] * self.scan_shape[1]
        if self.virtual:
            state["images"] = np.zeros((int(self._rows[-1]), n_pos), dtype=np.int64)
        if self.com is not None:
            for k in ("n", "sum_y", "sum_x"):
                state[k] = np.zeros(n_pos, dtype=np.int64)
        if self.diffraction is not None:
            state["sum"] = np.zeros(self.n_pixels, dtype=np.int64)
        return state

    def process(self, state: State, chunk: Chunk) -> None:
        com = self.com is not None
        n = state["n"] if com else None
        cells = None
        if self._cells is not None:  # a copy per concurrent call (nogil kernels, threads)
            try:
                cells = self._cells_free.pop()
            except IndexError:
                cells = self._cells.copy()
        try:
            bad = _fused_kernel(chunk.positions, chunk.offsets, chunk.indices,
                                *self._kernel_args, state.get("images", self._no_images), n,
                                state["sum_y"] if com else None,
                                state["sum_x"] if com else None, state.get("sum"), self._table,
                                cells, n if self.n_inside == self.n_codes else None)
        finally:
            if cells is not None:
                self._cells_free.append(cells)
        if bad[0] or bad[1]:
            raise_if_bad(self.label, *bad, self.n_pixels, int(self._n_pos))

    def split_state(self, state: State) -> dict[str, State]:
        """{wrapped operator name: its own state (views into ``state``)}."""
        out = {}
        for m, v in enumerate(self.virtual):
            out[v.name] = {"images": state["images"][self._rows[m]:self._rows[m + 1]]}
        if self.com is not None:
            out[self.com.name] = {k: state[k] for k in ("n", "sum_y", "sum_x")}
        if self.diffraction is not None:
            out[self.diffraction.name] = {"sum": state["sum"]}
        return out

    def finalize(self, state: State) -> dict[str, Result]:
        out = {}
        split = self.split_state(state)
        for p in self.parts:
            out.update(p.finalize(split[p.name]))
        return out


def one_pass(op) -> FusedStreaming:
    """``op`` alone through the fused kernel, built once per operator: how a VirtualDetectors
    with the "combos" kernel and a CenterOfMass process their chunks (the fused kernel's
    single-task paths are its fastest: 1.6-1.9x their former kernels). Same state, same
    results, errors under the operator's own name."""
    fused = op.__dict__.get("_one_pass")
    if fused is None:
        alone = op.fused_role == "virtual"
        fused = FusedStreaming([op] if alone else None, None if alone else op, None,
                               name=f"{op.name}.one-pass")
        fused.label = f"{type(op).__name__} {op.name!r}"
        op._one_pass = fused
    return fused


def _dense_rank(values: np.ndarray) -> tuple[int, np.ndarray]:
    """(number of distinct values, rank of each value among them), for non-negative ints:
    np.unique's inverse, by a table instead of a sort when the values are small (the
    detector's pixel classes: 1 ms instead of 100 ms at 576 x 576, at every scan start)."""
    top = int(values.max()) + 1 if len(values) else 0
    if top > 4 * len(values) + 4096:
        distinct, inverse = np.unique(values, return_inverse=True)
        return len(distinct), inverse.reshape(-1)
    seen = np.zeros(top, bool)
    seen[values] = True
    rank = np.cumsum(seen) - 1
    return int(rank[-1] + 1) if top else 0, rank[values]


def _fusable(op) -> bool:
    role = getattr(op, "fused_role", None)
    return (role == "virtual" and op.kernel == "combos") or role in ("com", "diffraction")


_ROLE_ORDER = {"virtual": 0, "com": 1, "diffraction": 2}


def _in_order(run) -> bool:
    """Whether fusing ``run`` keeps its results in order: virtual detectors first, then at
    most one CoM, then at most one diffraction sum (what FusedStreaming.parts returns)."""
    ranks = [_ROLE_ORDER[o.fused_role] for o in run]
    return ranks == sorted(ranks) and ranks.count(1) <= 1 and ranks.count(2) <= 1


def _fuse(run, name):
    """FusedStreaming of the operators in ``run``, or None if they cannot be fused."""
    pick = (lambda role: next((o for o in run if o.fused_role == role), None))
    try:
        fused = FusedStreaming([o for o in run if o.fused_role == "virtual"],
                               pick("com"), pick("diffraction"), name=name)
    except ValueError:  # different geometries, too many pixel classes
        return None
    return fused if fused.parts == list(run) else None


def fuse_operators(ops, name="fused") -> list:
    """Replace a run of fusable operators in a pipeline list by one :class:`FusedStreaming`.

    Parameters
    ----------
    ops : list of operators, as ``stream.config.build_operators`` returns.
    name : name of the fused operator; must not be the name of another operator in ``ops``.

    Returns
    -------
    A new list. The first run of at least two consecutive fusable operators
    (VirtualDetectors with the "combos" kernel, then at most one CenterOfMass, then at most
    one DiffractionSum, as many as fit in 256 pixel classes) is replaced by one
    FusedStreaming in its place, so that finalizing the new list gives the same results in
    the same order. Without such a run, a copy of ``ops``.
    """
    ops = list(ops)
    i = 0
    while i < len(ops):
        # the longest run from i whose every prefix keeps the results' order ...
        j = i
        while j < len(ops) and _fusable(ops[j]) and _in_order(ops[i:j + 1]):
            j += 1
        # ... built once, shorter only if it does not fit (different detectors, too many
        # classes: adding an operator never mends either), since building costs a pass over
        # the detector's pixels per operator at every scan start
        for k in range(j, i + 1, -1):
            fused = _fuse(ops[i:k], name)
            if fused is not None:
                return ops[:i] + [fused] + ops[k:]
        i += 1
    return ops
