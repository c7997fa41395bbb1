"""What a reported radius means when σ may depend on the input.

Every results file names one of these kinds in its metadata, and every table prints it.
"""

FIXED_SIGMA = "fixed_sigma"
PER_SIGMA = "per_sigma"

MEANING = {
    FIXED_SIGMA: "sound: Cohen et al. CERTIFY of the smoothed classifier g_sigma, one sigma for "
                 "every input",
    PER_SIGMA: "certifies g_sigma at the chosen sigma; not a certificate of the input-dependent "
               "classifier G(x) = g_sigma(x)(x) (Insta-RS as published; see Sukenik et al., "
               "ICML 2022)",
}
