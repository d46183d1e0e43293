//! How a tensor's elements lie in its file when they are not one contiguous run: a
//! strided view of a storage (PyTorch checkpoints save views, e.g. a transposed or
//! sliced tensor, as their storage plus strides). The shard reads the view's span and
//! [`Strided::gather`] puts the elements in row-major order.

/// A tensor that is not a contiguous run of its storage, gathered element by element.
#[derive(Debug, Clone, PartialEq)]
pub struct Strided {
    /// File offset of the first element the view touches.
    pub span_start: u64,
    /// Bytes from `span_start` that cover every element of the view.
    pub span_len: u64,
    pub shape: Vec<usize>,
    /// In elements, relative to `span_start`.
    pub strides: Vec<usize>,
    pub elem_size: usize,
}

impl Strided {
    /// The view's elements in row-major order, from the bytes of its span.
    pub fn gather(&self, span: &[u8]) -> Vec<u8> {
        let es = self.elem_size;
        let numel: usize = self.shape.iter().product();
        let mut out = Vec::with_capacity(numel * es);
        if numel == 0 {
            return out;
        }
        let nd = self.shape.len();
        let (inner_n, inner_s) = (self.shape[nd - 1], self.strides[nd - 1]);
        let mut idx = vec![0usize; nd.saturating_sub(1)];
        loop {
            let base: usize = idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum();
            for j in 0..inner_n {
                let e = (base + j * inner_s) * es;
                out.extend_from_slice(&span[e..e + es]);
            }
            // Next index over the outer dimensions, last fastest.
            let mut d = idx.len();
            loop {
                if d == 0 {
                    return out;
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
}
