//! A restricted unpickler for PyTorch checkpoints: it builds values, never runs code.
//!
//! Python's pickle is a small stack machine whose `GLOBAL` + `REDUCE` opcodes call any
//! importable function — loading an untrusted `pytorch_model.bin` with `torch.load` can
//! run arbitrary code. This machine knows the opcodes (protocols 2–5) that `torch.save`
//! emits for a state dict and exactly the callables it uses there:
//! `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter`, and storage types / dtypes as persistent ids
//! (`torch.FloatStorage`, `torch.bfloat16`, …). Any other global is refused with an error
//! naming it; nothing is ever imported or called.

use crate::checkpoint::dtype::DType;

/// A value the machine can build.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, as its little-endian two's complement bytes (the
    /// legacy format's magic number is one).
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Dicts and OrderedDicts, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// An allowed global, `module.name`.
    Global(String),
    /// A storage named by a persistent id.
    Storage(StorageRef),
    Tensor(TensorRef),
}

/// `('storage', storage type, key, location, numel)`: where a tensor's data lives.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: Result<DType, String>,
    /// Elements in the storage.
    pub numel: u64,
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, …)`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    /// In elements.
    pub storage_offset: u64,
    pub shape: Vec<usize>,
    /// In elements.
    pub strides: Vec<usize>,
}

/// Globals a state dict may name. Everything else is refused.
fn allowed_global(module: &str, name: &str) -> bool {
    match module {
        "collections" => name == "OrderedDict",
        "torch._utils" => matches!(name, "_rebuild_tensor_v2" | "_rebuild_parameter"),
        "torch" => storage_dtype(name).is_some(),
        _ => false,
    }
}

/// The element type of a storage type (`FloatStorage`) or dtype (`bfloat16`) global;
/// `Some(Err)` for a known one weightdiff does not decode.
fn storage_dtype(name: &str) -> Option<Result<DType, String>> {
    let d = match name {
        "DoubleStorage" | "float64" => DType::F64,
        "FloatStorage" | "float32" => DType::F32,
        "HalfStorage" | "float16" => DType::F16,
        "BFloat16Storage" | "bfloat16" => DType::BF16,
        "LongStorage" | "int64" => DType::I64,
        "uint16" => DType::U16,
        "uint32" => DType::U32,
        "uint64" => DType::U64,
        "IntStorage" | "int32" => DType::I32,
        "ShortStorage" | "int16" => DType::I16,
        "CharStorage" | "int8" => DType::I8,
        "ByteStorage" | "uint8" => DType::U8,
        "BoolStorage" | "bool" => DType::BOOL,
        "float8_e4m3fn" => DType::F8E4M3,
        "float8_e5m2" => DType::F8E5M2,
        "ComplexFloatStorage"
        | "ComplexDoubleStorage"
        | "QInt8Storage"
        | "QUInt8Storage"
        | "QInt32Storage"
        | "complex64"
        | "complex128"
        | "float8_e4m3fnuz"
        | "float8_e5m2fnuz" => {
            return Some(Err(name.to_string()));
        }
        _ => return None,
    };
    Some(Ok(d))
}

/// Why a pickle was refused, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct PickleError {
    pub offset: usize,
    pub reason: String,
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pickle byte {}: {}", self.offset, self.reason)
    }
}

/// Bounds that keep a hostile pickle from making us allocate freely.
const MAX_MEMO: usize = 1 << 20;
const MAX_STACK: usize = 1 << 20;
/// Values copied by memo lookups (`BINGET`) and `DUP`, in nodes: a state dict copies a
/// few per tensor; a hostile pickle fetching a huge list over and over would otherwise
/// grow memory quadratically in its size.
const MAX_COPIED: usize = 1 << 24;

impl Value {
    /// Nodes in this value (itself and everything it contains).
    fn nodes(&self) -> usize {
        1 + match self {
            Value::Tuple(v) | Value::List(v) => v.iter().map(Value::nodes).sum(),
            Value::Dict(v) => v.iter().map(|(k, x)| k.nodes() + x.nodes()).sum(),
            _ => 0,
        }
    }
}

/// Runs the pickle at the start of `data`; returns the value and the bytes consumed
/// (the legacy format has several pickles and raw storages back to back).
pub fn load(data: &[u8]) -> Result<(Value, usize), PickleError> {
    Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: std::collections::HashMap::new(),
        copied: 0,
    }
    .run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: std::collections::HashMap<u64, Value>,
    /// Nodes copied so far (see [`MAX_COPIED`]).
    copied: usize,
}

impl Machine<'_> {
    fn err<T>(&self, reason: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError {
            offset: self.pos,
            reason: reason.into(),
        })
    }

    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        match self.pos.checked_add(n).filter(|&e| e <= self.data.len()) {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => self.err("truncated pickle"),
        }
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.data[self.pos..];
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("unterminated text argument");
        };
        let s = String::from_utf8(rest[..nl].to_vec());
        self.pos += nl + 1;
        s.or_else(|_| self.err("text argument is not UTF-8"))
    }

    fn string(&mut self, n: u64) -> Result<Value, PickleError> {
        let n = usize::try_from(n).or_else(|_| self.err("string length overflows"))?;
        let b = self.take(n)?.to_vec();
        match String::from_utf8(b) {
            Ok(s) => Ok(Value::Str(s)),
            Err(_) => self.err("string is not UTF-8"),
        }
    }

    fn bytes(&mut self, n: u64) -> Result<Value, PickleError> {
        let n = usize::try_from(n).or_else(|_| self.err("bytes length overflows"))?;
        Ok(Value::Bytes(self.take(n)?.to_vec()))
    }

    fn push(&mut self, v: Value) -> Result<(), PickleError> {
        if self.stack.len() >= MAX_STACK {
            return self.err("pickle stack too deep");
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return self.err("pop across a mark");
        }
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.err("stack underflow"),
        }
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        if self.stack.is_empty() {
            return self.err("stack underflow");
        }
        Ok(self.stack.last_mut().expect("non-empty"))
    }

    /// The values pushed since the last MARK.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        match self.marks.pop() {
            Some(m) if m <= self.stack.len() => Ok(self.stack.split_off(m)),
            _ => self.err("no mark on the stack"),
        }
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let Some(nodes) = self.stack.last().map(Value::nodes) else {
            return self.err("memoize with an empty stack");
        };
        self.charge(nodes)?;
        let v = self.stack.last().expect("checked above").clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return self.err("memo too large");
        }
        self.memo.insert(key, v);
        Ok(())
    }

    /// Accounts for copying `nodes` values, before the copy is made; refuses once the
    /// pickle has copied too much.
    fn charge(&mut self, nodes: usize) -> Result<(), PickleError> {
        self.copied += nodes;
        if self.copied > MAX_COPIED {
            return self.err("pickle copies too many values (not a state dict)");
        }
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        let Some(nodes) = self.memo.get(&key).map(Value::nodes) else {
            return self.err(format!("memo key {key} was never stored"));
        };
        self.charge(nodes)?;
        let v = self.memo[&key].clone();
        self.push(v)
    }

    fn global(&mut self, module: String, name: String) -> Result<(), PickleError> {
        if !allowed_global(&module, &name) {
            return self.err(format!(
                "refusing global `{module}.{name}`: weightdiff reads tensors only and never runs code from a checkpoint (a state dict does not need it)"
            ));
        }
        self.push(Value::Global(format!("{module}.{name}")))
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return self.err("odd number of items for a dict");
        }
        let Value::Dict(d) = self.top()? else {
            return self.err("SETITEMS on a value that is not a dict");
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn run(mut self) -> Result<(Value, usize), PickleError> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?; // PROTO
                    if p > 5 {
                        return self.err(format!("pickle protocol {p} is newer than 5"));
                    }
                }
                0x95 => {
                    self.le::<8>()?; // FRAME: a size hint only
                }
                b'.' => {
                    let v = self.pop()?; // STOP
                    return Ok((v, self.pos));
                }
                b'(' => self.marks.push(self.stack.len()), // MARK
                b'0' => {
                    self.pop()?; // POP
                }
                b'1' => {
                    self.pop_mark()?; // POP_MARK
                }
                b'2' => {
                    let nodes = self.top()?.nodes(); // DUP
                    self.charge(nodes)?;
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?); // BININT
                    self.push(Value::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?; // BININT1
                    self.push(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?); // BININT2
                    self.push(Value::Int(v as i64))?
                }
                0x8a => {
                    let n = self.u8()? as usize; // LONG1: little-endian two's complement
                    let b = self.take(n)?.to_vec();
                    if n > 8 {
                        self.push(Value::BigInt(b))?;
                        continue;
                    }
                    let mut v: i64 = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        -1
                    } else {
                        0
                    };
                    for &x in b.iter().rev() {
                        v = (v << 8) | x as i64;
                    }
                    self.push(Value::Int(v))?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?); // BINFLOAT (big-endian)
                    self.push(Value::Float(v))?
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.le()?); // BINUNICODE
                    let v = self.string(n as u64)?;
                    self.push(v)?
                }
                0x8c => {
                    let n = self.u8()?; // SHORT_BINUNICODE
                    let v = self.string(n as u64)?;
                    self.push(v)?
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.le()?); // BINUNICODE8
                    let v = self.string(n)?;
                    self.push(v)?
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.le()?); // BINBYTES
                    let v = self.bytes(n as u64)?;
                    self.push(v)?
                }
                b'C' => {
                    let n = self.u8()?; // SHORT_BINBYTES
                    let v = self.bytes(n as u64)?;
                    self.push(v)?
                }
                0x8e => {
                    let n = u64::from_le_bytes(self.le()?); // BINBYTES8
                    let v = self.bytes(n)?;
                    self.push(v)?
                }
                b')' => self.push(Value::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?; // TUPLE
                    self.push(Value::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize; // TUPLE1..3
                    if self.stack.len() < n
                        || self.marks.last().is_some_and(|&m| m > self.stack.len() - n)
                    {
                        return self.err("stack underflow");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::Tuple(items))?
                }
                b']' => self.push(Value::List(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?; // LIST
                    self.push(Value::List(items))?
                }
                b'a' => {
                    let v = self.pop()?; // APPEND
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => return self.err("APPEND to a value that is not a list"),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?; // APPENDS
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => return self.err("APPENDS to a value that is not a list"),
                    }
                }
                b'}' => self.push(Value::Dict(Vec::new()))?,
                b'd' => {
                    let items = self.pop_mark()?; // DICT
                    self.push(Value::Dict(Vec::new()))?;
                    self.set_items(items)?
                }
                b's' => {
                    let v = self.pop()?; // SETITEM
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?; // SETITEMS
                    self.set_items(items)?
                }
                b'q' => {
                    let k = self.u8()?; // BINPUT
                    self.memo_put(k as u64)?
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.le()?); // LONG_BINPUT
                    self.memo_put(k as u64)?
                }
                0x94 => {
                    let k = self.memo.len() as u64; // MEMOIZE
                    self.memo_put(k)?
                }
                b'p' => {
                    let k = self.line()?; // PUT
                    let k = k.parse().or_else(|_| self.err("bad PUT key"))?;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()?; // BINGET
                    self.memo_get(k as u64)?
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.le()?); // LONG_BINGET
                    self.memo_get(k as u64)?
                }
                b'g' => {
                    let k = self.line()?; // GET
                    let k = k.parse().or_else(|_| self.err("bad GET key"))?;
                    self.memo_get(k)?
                }
                b'c' => {
                    let module = self.line()?; // GLOBAL
                    let name = self.line()?;
                    self.global(module, name)?
                }
                0x93 => {
                    let name = self.pop()?; // STACK_GLOBAL
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.global(m, n)?,
                        _ => return self.err("STACK_GLOBAL needs two strings"),
                    }
                }
                b'R' => {
                    let args = self.pop()?; // REDUCE
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.push(v)?
                }
                b'Q' => {
                    let pid = self.pop()?; // BINPERSID
                    let v = self.persistent(pid)?;
                    self.push(v)?
                }
                b'b' => {
                    // BUILD: state for the object below. torch sets `_metadata` on the
                    // OrderedDict of a state dict; it holds no weights, so it is dropped.
                    self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        _ => return self.err("BUILD on a value that is not a dict or tensor"),
                    }
                }
                _ => {
                    self.pos -= 1;
                    return self.err(format!(
                        "opcode 0x{op:02x} is not one torch.save writes for a state dict"
                    ));
                }
            }
        }
    }

    fn reduce(&self, callable: Value, args: Value) -> Result<Value, PickleError> {
        let Value::Global(f) = callable else {
            return self.err("REDUCE on a value that is not a global");
        };
        let Value::Tuple(args) = args else {
            return self.err("REDUCE arguments are not a tuple");
        };
        match f.as_str() {
            "collections.OrderedDict" if args.is_empty() => Ok(Value::Dict(Vec::new())),
            "torch._utils._rebuild_parameter" => match args.into_iter().next() {
                Some(t @ Value::Tensor(_)) => Ok(t),
                _ => self.err("_rebuild_parameter without a tensor"),
            },
            "torch._utils._rebuild_tensor_v2" => self.rebuild_tensor(args),
            _ => self.err(format!("`{f}` cannot be called with these arguments")),
        }
    }

    fn rebuild_tensor(&self, args: Vec<Value>) -> Result<Value, PickleError> {
        let mut it = args.into_iter();
        let (Some(Value::Storage(storage)), Some(Value::Int(offset)), Some(size), Some(stride)) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return self.err("_rebuild_tensor_v2 needs (storage, offset, size, stride, ...)");
        };
        let dims = |v: Value, what: &str| -> Result<Vec<usize>, PickleError> {
            let Value::Tuple(items) = v else {
                return self.err(format!("tensor {what} is not a tuple"));
            };
            items
                .into_iter()
                .map(|x| match x {
                    Value::Int(i) if i >= 0 => Ok(i as usize),
                    _ => self.err(format!("tensor {what} holds a non-integer")),
                })
                .collect()
        };
        let shape = dims(size, "size")?;
        let strides = dims(stride, "stride")?;
        if shape.len() != strides.len() {
            return self.err("tensor size and stride differ in length");
        }
        if offset < 0 {
            return self.err("negative storage offset");
        }
        Ok(Value::Tensor(TensorRef {
            storage,
            storage_offset: offset as u64,
            shape,
            strides,
        }))
    }

    fn persistent(&self, pid: Value) -> Result<Value, PickleError> {
        let Value::Tuple(items) = pid else {
            return self.err("persistent id is not a tuple");
        };
        match items.as_slice() {
            [
                Value::Str(tag),
                Value::Global(ty),
                Value::Str(key),
                Value::Str(_location),
                Value::Int(numel),
                rest @ ..,
            ] if tag == "storage" && *numel >= 0 => {
                // PyTorch < 1.0 could name a view into another storage here.
                if rest.first().is_some_and(|v| *v != Value::None) {
                    return self.err(
                        "storage views (files written by PyTorch before 1.0) are not supported",
                    );
                }
                let name = ty.strip_prefix("torch.").unwrap_or(ty);
                let Some(dtype) = storage_dtype(name) else {
                    return self.err(format!("`{ty}` is not a storage type"));
                };
                Ok(Value::Storage(StorageRef {
                    key: key.clone(),
                    dtype,
                    numel: *numel as u64,
                }))
            }
            _ => self.err("persistent id is not ('storage', type, key, location, numel)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_an_ordered_dict_of_a_tensor() {
        // torch.save({'w': torch.zeros(2, 3)}) with protocol 2, by hand.
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'w'];
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend(b"K\x00K\x02K\x03\x86K\x03K\x01\x86\x89ccollections\nOrderedDict\n)Rt");
        p.extend(b"Ru.");
        let (v, used) = load(&p).unwrap();
        assert_eq!(used, p.len());
        let Value::Dict(d) = v else { panic!() };
        assert_eq!(d[0].0, Value::Str("w".into()));
        let Value::Tensor(t) = &d[0].1 else { panic!() };
        assert_eq!(t.shape, [2, 3]);
        assert_eq!(t.strides, [3, 1]);
        assert_eq!(t.storage.numel, 6);
        assert_eq!(t.storage.dtype, Ok(DType::F32));
    }

    #[test]
    fn refuses_storage_views_of_pytorch_before_1_0() {
        let mut p = b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\n".to_vec();
        p.extend(b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06(X\x01\x00\x00\x001K\x00K\x02ttQ.");
        let e = load(&p).unwrap_err();
        assert!(e.reason.contains("storage views"), "{e}");
    }

    #[test]
    fn repeated_copies_of_a_large_value_are_bounded() {
        // A 60k-element list memoized, then fetched hundreds of times.
        let mut p = vec![0x80, 2, b']', b'('];
        p.extend(std::iter::repeat_n(b'N', 60_000));
        p.extend([b'e', b'q', 0]);
        p.extend(std::iter::repeat_n([b'h', 0, b'0'], 1_000).flatten());
        p.push(b'.');
        let e = load(&p).unwrap_err();
        assert!(e.reason.contains("copies too many"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut p = vec![0x80, 2];
            p.extend(body);
            let _ = load(&p);
        }
    }

    #[test]
    fn refuses_code_execution() {
        // The classic payload: posix.system('echo pwned').
        let p = b"\x80\x02cposix\nsystem\nX\x0a\x00\x00\x00echo pwned\x85R.";
        let e = load(p).unwrap_err();
        assert!(e.reason.contains("refusing global `posix.system`"), "{e}");
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        assert!(load(p).unwrap_err().reason.contains("builtins.eval"));
    }

    #[test]
    fn malformed_pickles_are_errors_not_panics() {
        for p in [
            &b""[..],
            b"\x80",
            b"\x80\x02(",
            b"\x80\x02t.",
            b"\x80\x02h\x05.",
            b"\x80\x02X\xff\xff\xff\xff",
            b"\x80\x02}K\x01u.",
            b"\x80\x02(K\x01(K\x02\x86.",
            b"\x80\x02K\x01K\x02R.",
            b"\x80\x09.",
            b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00.",
            b"\x80\x02\xff",
        ] {
            assert!(load(p).is_err(), "{p:?} accepted");
        }
    }
}
