"""Compile every Triton kernel of collapsekit to cubin for sm_80 and sm_90 (no GPU needed).

Run by tests/test_triton_compile.py in a subprocess without TRITON_INTERPRET (under the
interpreter the kernels are not compilable objects). Exit status 0: all compiled; 3: this triton
cannot compile ahead of time here (skipped by the test)."""
import itertools
import os
import sys

import triton
import triton.language as tl

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(3)

from collapsekit.kernels import etf_logits, nearest_center, pairwise, scatter, selective_scan, ssd_chunked, ssd_scan, \
    state_update, within_class

TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]
DTYPES = {"fp32": tl.float32, "fp64": tl.float64, "fp16": tl.float16, "bf16": tl.bfloat16}


def compile_for(fn, pointers, ints, consts, target):
    sig = {**pointers, **{k: "i64" for k in ints}, **{k: "constexpr" for k in consts}}
    for name in ("inv_k1", "alpha", "decay_scale"):
        if name in fn.arg_names:
            sig[name] = "fp64" if name == "inv_k1" else "fp32"
    sig = {k: sig[k] for k in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
    assert "cubin" in compiled.asm


def scatter_cases():
    for feat, has_weights in itertools.product(["bf16", "fp16", "fp32", "fp64"], [False, True]):
        acc = "fp64" if feat == "fp64" else "fp32"
        a = f"*{acc}"
        common = {"HAS_WEIGHTS": has_weights, "ACC": DTYPES[acc]}
        out = {"weights_ptr": a, "sums_ptr": a, "counts_ptr": a}
        sorted_ptrs = {"feat_ptr": f"*{feat}", "perm_ptr": "*i64", "sorted_labels_ptr": "*i64", **out}
        sorted_ints = ["M", "D", "K", "C", "fs0", "fs1", "ws0", "ws1"]
        for path, (bm, bd, _nw) in scatter.TILES.items():
            name = f"scatter.{path}[{feat}, weights={has_weights}]"
            if path == "atomic":
                yield name, scatter.class_sums_atomic_kernel, {"feat_ptr": f"*{feat}", "labels_ptr": "*i64", **out}, \
                    ["N", "D", "K", "C", "fs0", "fs1", "ls0", "ls1", "ws0", "ws1"], \
                    {**common, "BLOCK_N": bm, "BLOCK_D": bd}
            elif path == "scan":
                yield name, scatter.class_sums_scan_kernel, sorted_ptrs, sorted_ints, \
                    {**common, "BLOCK_M": bm, "BLOCK_D": bd}
            elif feat != "fp64":  # the launcher sends fp64 to the scan kernel
                dot = DTYPES[feat] if (feat in ("fp16", "bf16") and not has_weights) else DTYPES[acc]
                yield name, scatter.class_sums_sorted_kernel, sorted_ptrs, sorted_ints, \
                    {**common, "DOT": dot, "BLOCK_M": bm, "BLOCK_D": bd}


def within_class_cases():
    for feat, has_weights in itertools.product(["bf16", "fp16", "fp32", "fp64"], [False, True]):
        acc = "fp64" if feat == "fp64" else "fp32"
        bn, bd, _nw = within_class.TILES["variance"]
        yield f"within_class.variance[{feat}, weights={has_weights}]", within_class.within_class_variance_kernel, \
            {"feat_ptr": f"*{feat}", "labels_ptr": "*i64", "weights_ptr": f"*{acc}", "means_ptr": f"*{acc}",
             "out_ptr": f"*{acc}"}, \
            ["N", "D", "K", "C", "fs0", "fs1", "ls0", "ls1", "ws0", "ws1"], \
            {"HAS_WEIGHTS": has_weights, "ACC": DTYPES[acc], "BLOCK_N": bn, "BLOCK_D": bd}
        bn, bd, _nw = within_class.TILES["center"]
        yield f"within_class.center[{feat}, weights={has_weights}]", within_class.center_rows_kernel, \
            {"feat_ptr": f"*{feat}", "labels_ptr": "*i64", "weights_ptr": f"*{acc}", "means_ptr": f"*{acc}",
             "out_ptr": f"*{acc}", "out_w_ptr": f"*{acc}"}, \
            ["R", "D", "C", "fs0", "fs1", "ls0", "ws0"], \
            {"HAS_WEIGHTS": has_weights, "ACC": DTYPES[acc], "BLOCK_N": bn, "BLOCK_D": bd}

        bk, bd, _nw = within_class.TILES["covariance"]
        dot = DTYPES[feat] if feat in ("fp16", "bf16") else DTYPES[acc]
        yield f"within_class.covariance[{feat}, weights={has_weights}]", within_class.within_class_covariance_kernel, \
            {"feat_ptr": f"*{feat}", "labels_ptr": "*i64", "weights_ptr": f"*{acc}", "means_ptr": f"*{acc}",
             "out_ptr": f"*{acc}"}, \
            ["N", "D", "C", "fs0", "fs1", "ls0", "ws0", "rows_per_split"], \
            {"HAS_WEIGHTS": has_weights, "ACC": DTYPES[acc], "DOT": dot, "BLOCK_K": bk, "BLOCK_D": bd}


def pairwise_cases():
    ba, bb, _nw = pairwise.TILES["pairwise"]
    for gram, strict, has_var in itertools.product(["fp32", "fp64"], [False, True], [False, True]):
        yield f"pairwise.tile[{gram}, strict={strict}, var={has_var}]", pairwise.pairwise_tile_kernel, \
            {"gram_ptr": f"*{gram}", "n2a_ptr": "*fp64", "n2b_ptr": "*fp64", "va_ptr": "*fp64", "vb_ptr": "*fp64",
             "out_ptr": "*fp64"}, \
            ["TA", "TB", "gs0"], \
            {"STRICT_UPPER": strict, "HAS_VAR": has_var, "BLOCK_A": ba, "BLOCK_B": bb}


def nearest_center_cases():
    bn, bc, bd, _nw = nearest_center.TILES["nearest_center"]
    for feat in ["bf16", "fp16", "fp32"]:
        dot = DTYPES[feat]
        yield f"nearest_center[{feat}]", nearest_center.nearest_center_kernel, \
            {"feat_ptr": f"*{feat}", "means_ptr": "*fp32", "norms2_ptr": "*fp32", "out_ptr": "*i64"}, \
            ["N", "C", "D", "fs0", "fs1", "ms0"], \
            {"DOT": dot, "BLOCK_N": bn, "BLOCK_C": bc, "BLOCK_D": bd}


def etf_logits_cases():
    acc_of = lambda t: "fp64" if t == "fp64" else "fp32"
    for feat in ["bf16", "fp16", "fp32", "fp64"]:
        consts = {"DOT": DTYPES[feat], "ACC": DTYPES[acc_of(feat)]}
        par = f"*{acc_of(feat)}"
        bm, bc, bd, _ = etf_logits.TILES["fwd"]
        yield f"etf_logits_fwd[{feat}]", etf_logits.etf_logits_fwd_kernel, \
            {"h_ptr": f"*{feat}", "e_ptr": f"*{feat}", "out_ptr": f"*{feat}", "par_ptr": par}, \
            ["N", "C", "D", "hs0", "hs1", "es0", "es1", "os0"], {**consts, "BLOCK_M": bm, "BLOCK_C": bc, "BLOCK_D": bd}
        bm, bd, _ = etf_logits.TILES["norms"]
        yield f"row_inv_norms[{feat}]", etf_logits.row_inv_norms_kernel, \
            {"h_ptr": f"*{feat}", "inv_ptr": par, "par_ptr": par}, ["N", "D", "hs0", "hs1"], \
            {"ACC": consts["ACC"], "BLOCK_M": bm, "BLOCK_D": bd}
        bm, bc, bd, _ = etf_logits.TILES["grad_h"]
        yield f"etf_logits_grad_h[{feat}]", etf_logits.etf_logits_grad_h_kernel, \
            {"g_ptr": f"*{feat}", "l_ptr": f"*{feat}", "e_ptr": f"*{feat}", "h_ptr": f"*{feat}", "inv_ptr": par,
             "par_ptr": par, "out_ptr": f"*{feat}"}, \
            ["N", "C", "D", "gs0", "gs1", "ls0", "ls1", "es0", "es1", "hs0", "hs1"], \
            {**consts, "BLOCK_M": bm, "BLOCK_C": bc, "BLOCK_D": bd}
        bc, bd, bn, _ = etf_logits.TILES["grad_e"]
        yield f"etf_logits_grad_e[{feat}]", etf_logits.etf_logits_grad_e_kernel, \
            {"g_ptr": f"*{feat}", "h_ptr": f"*{feat}", "inv_ptr": par, "par_ptr": par, "out_ptr": par}, \
            ["N", "C", "D", "gs0", "gs1", "hs0", "hs1"], {**consts, "BLOCK_C": bc, "BLOCK_D": bd, "BLOCK_N": bn}


def ssd_scan_cases():
    ints_common = ["L", "NH", "P", "N", "HPG", "CS", "NCHUNK"]
    strides = [f"{a}s{i}" for a in "x" for i in range(4)] + ["ds0", "ds1", "ds2"] + \
        [f"{a}s{i}" for a in "bcz" for i in range(4)]
    for feat, flags in [("bf16", True), ("fp16", False), ("fp32", True), ("fp32", False), ("fp64", True)]:
        acc = "fp64" if feat == "fp64" else "fp32"
        a = f"*{acc}"
        consts = {"HAS_D": flags, "HAS_Z": flags, "HAS_BIAS": flags, "SOFTPLUS": flags, "CLAMP": flags,
                  "NORM_MAX": flags, "ACC": DTYPES[acc], "BLOCK_P": 64, "BLOCK_N": 128}
        yield f"ssd_fwd[{feat},{flags}]", ssd_scan.ssd_fwd_kernel, \
            {"x_ptr": f"*{feat}", "dt_ptr": a, "A_ptr": a, "B_ptr": f"*{feat}", "C_ptr": f"*{feat}", "D_ptr": a,
             "z_ptr": f"*{feat}", "bias_ptr": a, "init_ptr": a, "par_ptr": a, "out_ptr": f"*{feat}",
             "final_ptr": a, "norms_ptr": a, "ckpt_ptr": a, "pre_ptr": a}, ints_common + strides, \
            {**consts, "HAS_INIT": flags, "SAVE": flags}
        yield f"ssd_bwd[{feat},{flags}]", ssd_scan.ssd_bwd_kernel, \
            {"x_ptr": f"*{feat}", "dt_ptr": a, "A_ptr": a, "B_ptr": f"*{feat}", "C_ptr": f"*{feat}", "D_ptr": a,
             "z_ptr": f"*{feat}", "bias_ptr": a, "par_ptr": a, "ckpt_ptr": a, "pre_ptr": a, "scratch_ptr": a,
             "gout_ptr": f"*{feat}", "gfinal_ptr": a, "dx_ptr": f"*{feat}", "dz_ptr": f"*{feat}", "ddt_ptr": a,
             "dA_ptr": a, "dB_ptr": a, "dC_ptr": a, "dD_ptr": a, "dinit_ptr": a}, \
            ints_common + ["SLOTS"] + strides + ["gs0", "gs1", "gs2", "gs3"], {**consts, "HAS_GFINAL": flags}


def ssd_chunked_cases():
    """Every kernel of the chunked SSD (tiles as the launcher picks them for p=64, n=128, chunk 64),
    bf16 with every flag on: the tensor-core path through every branch. The other dtype/flag pairs
    (bf16 with flags off, fp16, fp32 (IEEE dot) with and without flags, fp64) take several more
    minutes than the slow test's 10-minute budget allows; COLLAPSEKIT_AOT_ALL=1 adds them."""
    K = ssd_chunked
    T = lambda name, **kw: {k: v for k, v in K._tile(name, **kw).items() if k != "num_warps"}
    xs = [f"xs{i}" for i in range(4)]
    bs = [f"bs{i}" for i in range(4)]
    cs = [f"cs{i}" for i in range(4)]
    zs = [f"zs{i}" for i in range(4)]
    ds = ["ds0", "ds1", "ds2"]
    sq = ["ss0", "ss1"]
    pairs = [("bf16", True)]
    if os.environ.get("COLLAPSEKIT_AOT_ALL") == "1":
        pairs += [("fp32", False), ("bf16", False), ("fp16", True), ("fp32", True), ("fp64", True)]
    for feat, flags in pairs:
        acc = "fp64" if feat == "fp64" else "fp32"
        a = f"*{acc}"
        f = f"*{feat}"
        typ = {"DOT": DTYPES[feat], "PREC": "ieee", "ACC": DTYPES[acc]}
        tag = f"[{feat},{flags}]"
        yield "ssd_chunked.cumsum_fwd" + tag, K._cumsum_fwd_kernel, \
            {"dt_ptr": a, "A_ptr": a, "bias_ptr": a, "par_ptr": a, "dtp_ptr": a, "cum_ptr": a}, \
            ["L", "NH", "CS", "NCHUNK"] + ds, \
            {"HAS_BIAS": flags, "SOFTPLUS": flags, "ACC": DTYPES[acc], "BLOCK_CS": 64}
        yield "ssd_chunked.chunk_state" + tag, K._chunk_state_kernel, \
            {"x_ptr": f, "B_ptr": f, "dtp_ptr": a, "cum_ptr": a, "st_ptr": a, "seq_ptr": "*i32"}, \
            ["L", "NH", "P", "N", "HPG", "CS", "NCHUNK"] + xs + bs + sq, {**typ, "HAS_SEQ": flags, **T("chunk_state", BLOCK_K=64)}
        sp = {k: v for k, v in K.TILES["state_passing"].items() if k != "num_warps"}
        yield "ssd_chunked.state_passing" + tag, K._state_passing_kernel, \
            {"st_ptr": a, "cum_ptr": a, "init_ptr": a, "par_ptr": a, "S_ptr": a, "final_ptr": a, "norm_ptr": a,
             "seq_ptr": "*i32"}, \
            ["NH", "PN", "CS", "NCHUNK", "L"] + sq, {"HAS_SEQ": flags, "HAS_INIT": flags, "NORM_MAX": flags, "ACC": DTYPES[acc], **sp}
        yield "ssd_chunked.bmm" + tag, K._bmm_kernel, {"C_ptr": f, "B_ptr": f, "cb_ptr": a}, \
            ["L", "G", "N", "CS", "NCHUNK"] + cs + bs, {**typ, **T("bmm", BLOCK_T=64, BLOCK_S=64)}
        yield "ssd_chunked.chunk_scan" + tag, K._chunk_scan_kernel, \
            {"x_ptr": f, "z_ptr": f, "C_ptr": f, "cb_ptr": a, "dtp_ptr": a, "cum_ptr": a, "S_ptr": a, "D_ptr": a,
             "out_ptr": f, "y_ptr": f, "seq_ptr": "*i32"}, \
            ["L", "NH", "P", "N", "HPG", "G", "CS", "NCHUNK"] + xs + zs + cs + sq, \
            {"HAS_SEQ": flags, "HAS_D": flags, "HAS_Z": flags, "SAVE_Y": flags, **typ, **T("chunk_scan", BLOCK_K=64)}
        yield "ssd_chunked.bwd_gate" + tag, K._bwd_gate_kernel, \
            {"gout_ptr": f, "z_ptr": f, "y_ptr": f, "gy_ptr": f, "dz_ptr": f}, \
            ["L", "NH", "P", "gs0", "gs1", "gs2", "gs3"] + zs, {"ACC": DTYPES[acc], "BLOCK_R": 32, "BLOCK_P": 64}
        yield "ssd_chunked.bwd_dstates" + tag, K._bwd_dstates_kernel, \
            {"gy_ptr": f, "C_ptr": f, "cum_ptr": a, "dS_ptr": a, "seq_ptr": "*i32"}, \
            ["L", "NH", "P", "N", "HPG", "CS", "NCHUNK"] + cs + sq, {**typ, "HAS_SEQ": flags, **T("dstates", BLOCK_K=64)}
        yield "ssd_chunked.state_passing_bwd" + tag, K._state_passing_bwd_kernel, \
            {"dS_ptr": a, "S_ptr": a, "cum_ptr": a, "gfinal_ptr": a, "norm_ptr": a, "par_ptr": a, "gst_ptr": a,
             "dcl_ptr": a, "dinit_ptr": a, "seq_ptr": "*i32"}, \
            ["NH", "PN", "CS", "NCHUNK", "NBLK", "L"] + sq, {"HAS_SEQ": flags, "HAS_GFINAL": flags, "NORM_MAX": flags, "ACC": DTYPES[acc], **sp}
        yield "ssd_chunked.bwd_dx" + tag, K._bwd_dx_kernel, \
            {"x_ptr": f, "B_ptr": f, "gy_ptr": f, "y_ptr": f, "cb_ptr": a, "dtp_ptr": a, "cum_ptr": a, "gst_ptr": a,
             "D_ptr": a, "dx_ptr": f, "ddt_ptr": a, "ddts_ptr": a, "dcy_ptr": a, "dD_ptr": a,
             "seq_ptr": "*i32"}, \
            ["L", "NH", "P", "N", "HPG", "G", "CS", "NCHUNK", "NPB", "NTB"] + xs + bs + sq, \
            {"HAS_SEQ": flags, "HAS_D": flags, **typ, **T("dx", BLOCK_K=64)}
        yield "ssd_chunked.bwd_dcb" + tag, K._bwd_dcb_kernel, \
            {"gy_ptr": f, "x_ptr": f, "dtp_ptr": a, "cum_ptr": a, "dcb_ptr": a, "seq_ptr": "*i32"}, \
            ["L", "NH", "P", "HPG", "G", "CS", "NCHUNK"] + xs + sq, {**typ, "HAS_SEQ": flags, **T("dcb", BLOCK_K=64)}
        yield "ssd_chunked.bwd_dbc" + tag, K._bwd_dbc_kernel, \
            {"x_ptr": f, "gy_ptr": f, "B_ptr": f, "C_ptr": f, "dcb_ptr": a, "dtp_ptr": a, "cum_ptr": a, "S_ptr": a,
             "gst_ptr": a, "dB_ptr": a, "dC_ptr": a, "seq_ptr": "*i32"}, \
            ["L", "NH", "P", "N", "HPG", "G", "CS", "NCHUNK"] + xs + bs + cs + sq, {**typ, "HAS_SEQ": flags, **T("dbc", BLOCK_K=64)}
        yield "ssd_chunked.window_scan" + tag, K._window_scan_kernel, \
            {"x_ptr": f, "z_ptr": f, "B_ptr": f, "C_ptr": f, "dtp_ptr": a, "cum_ptr": a, "D_ptr": a, "out_ptr": f,
             "y_ptr": f, "seq_ptr": "*i32"}, \
            ["L", "NH", "P", "N", "HPG", "CS", "NCHUNK", "W"] + xs + zs + bs + cs + sq, \
            {"HAS_SEQ": flags, "HAS_D": flags, "HAS_Z": flags, "SAVE_Y": flags, **typ, **T("chunk_scan", BLOCK_K=64)}
        yield "ssd_chunked.window_final" + tag, K._window_final_kernel, \
            {"x_ptr": f, "B_ptr": f, "dtp_ptr": a, "cum_ptr": a, "final_ptr": a, "seq_ptr": "*i32"}, \
            ["L", "NH", "P", "N", "HPG", "CS", "NCHUNK", "W"] + xs + bs + sq, \
            {"HAS_SEQ": flags, **typ, **T("chunk_state", BLOCK_K=64)}
        yield "ssd_chunked.window_dx" + tag, K._window_dx_kernel, \
            {"x_ptr": f, "B_ptr": f, "C_ptr": f, "gy_ptr": f, "y_ptr": f, "dtp_ptr": a, "cum_ptr": a, "gfinal_ptr": a,
             "D_ptr": a, "dx_ptr": f, "ddt_ptr": a, "dcy_ptr": a, "dD_ptr": a, "seq_ptr": "*i32"}, \
            ["L", "NH", "P", "N", "HPG", "CS", "NCHUNK", "NPB", "NTB", "W"] + xs + bs + cs + sq, \
            {"HAS_SEQ": flags, "HAS_D": flags, "HAS_GFINAL": flags, **typ, **T("dx", BLOCK_K=64)}
        for is_db in (False, True):
            yield f"ssd_chunked.window_dbc[{feat},{flags},db={is_db}]", K._window_dbc_kernel, \
                {"x_ptr": f, "gy_ptr": f, "B_ptr": f, "C_ptr": f, "dtp_ptr": a, "cum_ptr": a, "gfinal_ptr": a,
                 "out_ptr": a, "seq_ptr": "*i32"}, \
                ["L", "NH", "P", "N", "HPG", "G", "CS", "NCHUNK", "W"] + xs + bs + cs + sq, \
                {"IS_DB": is_db, "HAS_SEQ": flags, "HAS_GFINAL": flags, **typ, **T("dbc", BLOCK_K=64)}
        yield "ssd_chunked.cumsum_bwd" + tag, K._cumsum_bwd_kernel, \
            {"dt_ptr": a, "A_ptr": a, "bias_ptr": a, "par_ptr": a, "dtp_ptr": a, "ddtp_ptr": a, "ddts_ptr": a,
             "dcy_ptr": a, "dcl_ptr": a, "ddt_ptr": a, "dA_ptr": a, "dbias_ptr": a}, \
            ["L", "NH", "CS", "NCHUNK", "NPB", "NBLK"] + ds, \
            {"HAS_BIAS": flags, "SOFTPLUS": flags, "ACC": DTYPES[acc], "BLOCK_CS": 64, "BLOCK_B": 16}


def selective_scan_cases():
    """Forward and backward for each input dtype (u, delta, z, B, C share it here; the kernels convert
    each load, so mixed dtypes compile the same code) and each B/C form and flag set that changes
    the code: constant vs time-varying B/C, one group per block or not, z/D/bias/softplus/norms."""
    ints_fwd = ["dim", "L", "N", "dpg_b", "dpg_c", "nck", "chunk", "su0", "su1", "su2", "sd0", "sd1", "sd2",
                "sz0", "sz1", "sz2", "sb0", "sb1", "sb2", "sb3", "sc0", "sc1", "sc2", "sc3"]
    ints_bwd = ints_fwd[:5] + ["g_b", "g_c", "nck", "chunk", "n_dblk"] + ints_fwd[7:] + ["sg0", "sg1", "sg2"]
    ints_fwd = ints_fwd + ["sq0", "sq1"]
    ints_bwd = ints_bwd + ["sq0", "sq1"]
    elems, _nw = selective_scan.TILES["scan"]
    for x, n_state in [("bf16", 16), ("fp16", 16), ("fp32", 16), ("fp64", 16), ("fp32", 256)]:  # N=256: the largest tile
        acc = "fp64" if x == "fp64" else "fp32"
        a = f"*{acc}"
        bn = n_state
        bd = max(2, min(64, elems // bn))
        for var_b, var_c, flags in [(True, True, True), (False, False, False), (True, False, True), (False, True, False)]:
            mat = lambda var: f"*{x}" if var else "*fp32"
            fwd_ptrs = {"u_ptr": f"*{x}", "delta_ptr": f"*{x}", "z_ptr": f"*{x}", "A_ptr": a, "B_ptr": mat(var_b),
                        "C_ptr": mat(var_c), "D_ptr": a, "bias_ptr": a, "init_ptr": a, "out_ptr": a, "last_ptr": a,
                        "norms_ptr": a, "ckpt_ptr": a, "seq_ptr": "*i32"}
            yield f"selective_scan.fwd[{x}, N={n_state}, varB={var_b}, varC={var_c}, flags={flags}]", \
                selective_scan.selective_scan_fwd_kernel, fwd_ptrs, ints_fwd, \
                {"HAS_Z": flags, "HAS_D": flags, "HAS_BIAS": flags, "HAS_INIT": flags, "SOFTPLUS": flags,
                 "HAS_SEQ": flags, "NORMS": flags, "CKPT": True, "ACC": DTYPES[acc], "BLOCK_D": bd, "BLOCK_N": bn}
            bwd_ptrs = {k: v for k, v in fwd_ptrs.items() if k not in ("init_ptr", "out_ptr", "last_ptr", "norms_ptr")}
            bwd_ptrs.update({"gout_ptr": a, "glast_ptr": a, "gnorms_ptr": a, "xs_ptr": a, "gu_ptr": a,
                             "gdelta_ptr": a, "gz_ptr": a, "gA_ptr": a, "gB_ptr": a, "gC_ptr": a, "gD_ptr": a,
                             "ginit_ptr": a})
            for one_group in ([True, False] if (var_b or var_c) else [False]):
                yield f"selective_scan.bwd[{x}, N={n_state}, varB={var_b}, varC={var_c}, flags={flags}, " \
                      f"one_group={one_group}]", selective_scan.selective_scan_bwd_kernel, bwd_ptrs, ints_bwd, \
                    {"HAS_Z": flags, "HAS_D": flags, "HAS_BIAS": flags, "SOFTPLUS": flags, "HAS_SEQ": flags,
                     "HAS_GLAST": flags,
                     "HAS_GNORMS": flags, "VAR_B": var_b, "VAR_C": var_c, "ONE_GROUP_B": var_b and one_group,
                     "ONE_GROUP_C": var_c and one_group, "ACC": DTYPES[acc], "BLOCK_D": bd, "BLOCK_N": bn}


def state_update_cases():
    """The decode step: each state / input dtype, with and without the optional inputs."""
    ints = ["h", "P", "N", "hpg", "rows", "pad_slot_id", "ss0", "ss1", "ss2", "ss3", "xs0", "xs1", "xs2", "ds0",
            "ds1", "ds2", "as0", "as1", "as2", "bs0", "bs1", "bs2", "cs0", "cs1", "cs2", "Ds0", "Ds1", "zs0", "zs1",
            "zs2", "bis0", "bis1", "idx_s", "os0", "os1", "os2"]
    for x, flags in itertools.product(["bf16", "fp16", "fp32", "fp64"], [False, True]):
        acc = "fp64" if x == "fp64" else "fp32"
        ptrs = {"state_ptr": f"*{x}", "x_ptr": f"*{x}", "dt_ptr": f"*{x}", "A_ptr": "*fp32", "B_ptr": f"*{x}",
                "C_ptr": f"*{x}", "D_ptr": "*fp32", "z_ptr": f"*{x}", "bias_ptr": "*fp32", "idx_ptr": "*i64",
                "out_ptr": f"*{x}"}
        yield f"state_update[{x}, flags={flags}]", state_update.state_update_kernel, ptrs, ints, \
            {"HAS_D": flags, "HAS_Z": flags, "HAS_BIAS": flags, "HAS_IDX": flags, "SOFTPLUS": flags,
             "ACC": DTYPES[acc], "BLOCK_P": 32, "BLOCK_N": 128}


def all_cases():
    return list(itertools.chain(scatter_cases(), within_class_cases(), pairwise_cases(), nearest_center_cases(),
                                etf_logits_cases(), ssd_scan_cases(), selective_scan_cases(), state_update_cases(),
                                ssd_chunked_cases()))


def compile_share(worker: int, workers: int):
    """Compile every `workers`-th (target, case) pair starting at `worker`; returns (count, failure lines)."""
    jobs = [(t, c) for t in TARGETS for c in all_cases()][worker::workers]
    failed = []
    for target, (name, fn, ptrs, ints, consts) in jobs:
        try:
            compile_for(fn, ptrs, ints, consts, target)
        except Exception as e:  # report every failure, not just the first
            if "ptxas" in str(e).lower() and "not found" in str(e).lower():
                return len(jobs), ["NO-PTXAS " + str(e)]
            failed.append(f"FAILED sm_{target.arch} {name}: {type(e).__name__}: {str(e)[:500]}")
    return len(jobs), failed


def main():
    # one process per core: the compiles are independent and CPU-bound
    import concurrent.futures
    import os
    workers = max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(compile_share, range(workers), [workers] * workers))
    count = sum(r[0] for r in results)
    lines = [line for r in results for line in r[1]]
    if any(line.startswith("NO-PTXAS") for line in lines):
        print("no ptxas: " + lines[0])
        sys.exit(3)
    for line in lines:
        print(line)
    print(f"{count - len(lines)} compiled, {len(lines)} failed")
    sys.exit(1 if lines else 0)


if __name__ == "__main__":
    main()
