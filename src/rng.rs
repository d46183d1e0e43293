//! A small seeded normal generator shared by the synthetic builder and the randomized
//! SVD. It is written here rather than taken from `rand` because `rand` does not promise
//! the same stream across versions, and both fixtures and `--seed` results must not
//! change under a dependency update.

/// Standard normal values from SplitMix64 + Box–Muller, seeded by (seed, name, salt).
pub struct Gaussian {
    state: u64,
    spare: Option<f64>,
}

impl Gaussian {
    pub fn new(seed: u64, name: &str, salt: &str) -> Gaussian {
        // FNV-1a over salt and name, mixed with the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in salt.bytes().chain([0u8]).chain(name.bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Gaussian {
            state: h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// ±1 with equal probability, 64 draws per generator step (a Rademacher test matrix
    /// for the randomized SVD: as good a range finder as a Gaussian one, HMT 2011 §4.6,
    /// at a fraction of the cost of Box–Muller).
    pub fn signs(&mut self, out: &mut [f64]) {
        for chunk in out.chunks_mut(64) {
            let bits = self.next_u64();
            for (i, o) in chunk.iter_mut().enumerate() {
                *o = if (bits >> i) & 1 == 1 { 1.0 } else { -1.0 };
            }
        }
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// The next standard normal value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u, v) = (self.uniform(), self.uniform());
        let r = (-2.0 * u.ln()).sqrt();
        let t = std::f64::consts::TAU * v;
        self.spare = Some(r * t.sin());
        r * t.cos()
    }
}
