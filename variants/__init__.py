"""Variant plugins: one idea per file, each registered by name in a hook family (looplm.hooks).

This package deliberately imports nothing: a gin file selects a plugin by importing its module
(`import variants.sampled_step`), which registers it. The core never imports `variants/`.

    truncated.py     BACKPROP_WINDOWS  last_loops (LastLoops: HRM one-step k=1, Huginn k=8),
                                       ramped_last_loops (RampedLastLoops: retrofitted recurrence)
    sampled_step.py  ESTIMATORS        sampled_step (SampledStep: one loop t ~ q, p_t/q_t CE_t, with
                                       the remedies: loops 1..t read out, CE_1 control variate, ...)
    step_proposals.py PROPOSALS        uniform, fixed_schedule, clts (curriculum), improvement
    step_weightings.py WEIGHTINGS      none, min_snr (Min-SNR-gamma mapped to loops)
    step_gate.py                       the Stage II gate target of SampledStep(gate_target="stage2")
    random_loops.py  LOOP_COUNTS       lognormal, poisson, uniform (STARS), poisson_lognormal
                                       (Huginn), ramped (retrofitted recurrence)
    jacobian.py      REGULARIZERS      stars_jacobian (PowerIterationJacobian: STARS),
                                       hutchinson_jacobian (HutchinsonJacobian: ||J||_F^2),
                                       spectral_jacobian (SpectralJacobian: sigma_max^2)
    priors.py        EXIT_PRIORS       geometric (GeometricPrior: KL(p || pi), PonderNet), none
    norms.py         PLACEMENTS        pre_norm, post_norm, sandwich_dual, deepnorm
                     NORMS             layernorm, simplenorm
    trajectory.py    REGULARIZERS      l2_limit (L2Limit: STARS mean ||x_T - x_{T-1}||)
"""
