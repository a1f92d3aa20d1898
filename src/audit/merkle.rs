//! Merkle trees over the audit log, as Certificate Transparency v2 defines them (RFC 9162 §2.1).
//!
//! The tamper-evident audit log hashes each audit record, in sequence order, into one leaf of
//! a Merkle tree. The tree's root (its Merkle Tree Hash, MTH) commits to every record and to
//! their order; an *inclusion proof* shows that one record is in a tree of a given size and
//! root, and a *consistency proof* shows that a later tree is an append-only extension of an
//! earlier one, so nothing logged before was changed, dropped or reordered. Everything here
//! is exactly RFC 9162's definitions with SHA-256, so any CT-style verifier agrees with it:
//!
//! - §2.1.1, Merkle Tree Hash: [`root`], with [`leaf_hash`] and [`node_hash`]. The tree over
//!   `n > 1` leaves splits at `k`, the largest power of two *strictly less* than `n` (not the
//!   midpoint), and the empty tree's hash is SHA-256 of the empty string.
//! - §2.1.3.1 and §2.1.3.2, inclusion proofs (audit paths): [`inclusion_proof`] and
//!   [`verify_inclusion`].
//! - §2.1.4.1 and §2.1.4.2, consistency proofs: [`consistency_proof`] and
//!   [`verify_consistency`].
//!
//! # Domain separation
//! A leaf is hashed as `SHA-256(0x00 || data)` and an interior node as
//! `SHA-256(0x01 || left || right)`. Without the prefixes, the 64 bytes `left || right` of any
//! interior node would also be a valid leaf *record*, and its leaf hash would equal the node's
//! hash: a forger could present a shorter tree whose "leaf" is really a subtree and get the
//! same root (a second preimage of the tree). With the prefixes, leaf hashes and node hashes
//! are taken over disjoint sets of inputs, so a leaf can never stand in for a subtree, nor the
//! other way round, short of a SHA-256 collision.
//!
//! # Complexity
//! - [`root`], [`inclusion_proof`] and [`consistency_proof`] follow the RFC's recursive
//!   definitions over the leaf hashes: O(n) node hashes in all, recursion depth O(log n)
//!   (about 20 for a million leaves), and proofs of O(log n) hashes.
//! - [`verify_inclusion`] and [`verify_consistency`] are the RFC's iterative algorithms:
//!   O(log n) hashes, O(1) memory, and they stop early (returning `false`) on a proof that
//!   is too long, so a hostile proof cannot make them do more than ~64 hashes.
//! - [`Frontier`] computes the same root incrementally while keeping only the roots of the
//!   O(log n) perfect subtrees that make up the tree so far: amortised one node hash per
//!   [`Frontier::push`], and O(log n) for [`Frontier::root`]. A verifier can therefore
//!   re-derive the root of a million records while streaming them, without holding every
//!   leaf.
//!
//! No function here panics on any input: an index or size that does not fit gives `None`
//! (generation) or `false` (verification).

use sha2::{Digest, Sha256};

/// A SHA-256 digest: a leaf hash, a node hash or a tree root.
pub type Hash = [u8; 32];

/// The prefix byte of a leaf hash's input (RFC 9162 §2.1.1).
const LEAF_PREFIX: u8 = 0x00;
/// The prefix byte of an interior node hash's input (RFC 9162 §2.1.1).
const NODE_PREFIX: u8 = 0x01;

/// SHA-256(0x00 || data): the hash of one leaf, i.e. of one audit record's bytes.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([LEAF_PREFIX]);
    hasher.update(data);
    hasher.finalize().into()
}

/// SHA-256(0x01 || left || right): the hash of an interior node from its two children.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([NODE_PREFIX]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// SHA-256 of the empty string: the Merkle Tree Hash of the empty tree.
fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The largest power of two strictly less than `n`; `n` must be at least 2.
fn split_point(n: usize) -> usize {
    debug_assert!(n >= 2);
    let below = n - 1;
    1 << (usize::BITS - 1 - below.leading_zeros())
}

/// MTH over leaf hashes (already leaf-hashed), RFC 9162 2.1.1; the empty tree is SHA-256("").
///
/// `MTH({}) = SHA-256()`, `MTH({d}) = d` for one leaf hash `d`, and for `n > 1` leaves
/// `MTH(D[n]) = node_hash(MTH(D[0:k]), MTH(D[k:n]))` with `k` the largest power of two `< n`.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves {
        [] => empty_root(),
        leaves => mth(leaves),
    }
}

/// MTH of a non-empty run of leaf hashes.
fn mth(leaves: &[Hash]) -> Hash {
    match leaves {
        [] => empty_root(),
        [only] => *only,
        _ => {
            let (left, right) = leaves.split_at(split_point(leaves.len()));
            node_hash(&mth(left), &mth(right))
        }
    }
}

/// Inclusion proof (audit path) for leaf `index` in the tree of `leaves` (RFC 9162 2.1.3.1). None if index >= len.
///
/// The path lists the sibling subtree hashes from the leaf's level up to the root's children,
/// deepest first; it is empty for a tree of one leaf.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    let mut proof = Vec::new();
    audit_path(index, leaves, &mut proof);
    Some(proof)
}

/// PATH(m, D[n]) of RFC 9162 §2.1.3.1, appended to `out`; `m < leaves.len()`.
fn audit_path(m: usize, leaves: &[Hash], out: &mut Vec<Hash>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split_point(n);
    let (left, right) = leaves.split_at(k);
    if m < k {
        audit_path(m, left, out);
        out.push(mth(right));
    } else {
        audit_path(m - k, right, out);
        out.push(mth(left));
    }
}

/// Verifies an inclusion proof (RFC 9162 2.1.3.2): leaf hash, index, tree size, proof, expected root.
///
/// True exactly when folding `proof` into `leaf` along the path that `index` and `tree_size`
/// determine gives `root`, with every proof element used and none left over.
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    tree_size: u64,
    proof: &[Hash],
    root: &Hash,
) -> bool {
    // 1. The index must be inside the tree.
    if index >= tree_size {
        return false;
    }
    // 2. and 3.
    let mut fnode = index;
    let mut snode = tree_size - 1;
    let mut r = *leaf;
    // 4.
    for p in proof {
        if snode == 0 {
            // More proof than the tree is tall.
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                // The right edge of the tree: climb past the levels where this subtree has
                // no right sibling.
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    // 5. All of the path consumed, and the computed root matches.
    snode == 0 && r == *root
}

/// Consistency proof between the first `old_size` leaves and all `leaves` (RFC 9162 2.1.4.1). None if old_size > len or old_size == 0.
///
/// `PROOF(m, D[n]) = SUBPROOF(m, D[n], true)`; it is empty when `old_size == leaves.len()`.
pub fn consistency_proof(leaves: &[Hash], old_size: usize) -> Option<Vec<Hash>> {
    if old_size == 0 || old_size > leaves.len() {
        return None;
    }
    let mut proof = Vec::new();
    subproof(old_size, leaves, true, &mut proof);
    Some(proof)
}

/// SUBPROOF(m, D[n], b) of RFC 9162 §2.1.4.1, appended to `out`; `1 <= m <= leaves.len()`.
fn subproof(m: usize, leaves: &[Hash], whole_old_tree: bool, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if m == n {
        // The old tree (or the subtree of it reached here) is a complete subtree of the new
        // one. The verifier knows the old root already, so it is only sent when it is a
        // proper subtree of the old tree.
        if !whole_old_tree {
            out.push(mth(leaves));
        }
        return;
    }
    // m < n, so n >= 2.
    let k = split_point(n);
    let (left, right) = leaves.split_at(k);
    if m <= k {
        subproof(m, left, whole_old_tree, out);
        out.push(mth(right));
    } else {
        subproof(m - k, right, false, out);
        out.push(mth(left));
    }
}

/// Verifies a consistency proof (RFC 9162 2.1.4.2).
///
/// True exactly when `proof` shows that the tree of `new_size` leaves with root `new_root`
/// extends the tree of `old_size` leaves with root `old_root`. When the sizes are equal the
/// proof must be empty and the roots equal. An `old_size` of 0 is rejected, as
/// [`consistency_proof`] gives no proof for it (the empty tree commits to nothing), and so is
/// `old_size > new_size`.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> bool {
    if old_size == 0 || old_size > new_size {
        return false;
    }
    if old_size == new_size {
        return proof.is_empty() && old_root == new_root;
    }
    // 1. A proof between two different sizes is never empty.
    let Some((head, tail)) = proof.split_first() else {
        return false;
    };
    // 2. If the old size is a power of two the old tree is a complete subtree of the new one,
    //    and its root is where the path starts: "prepend first_hash to the path".
    let (start, rest) = if old_size.is_power_of_two() {
        (*old_root, proof)
    } else {
        (*head, tail)
    };
    // 3.
    let mut fnode = old_size - 1;
    let mut snode = new_size - 1;
    // 4.
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    // 5.
    let mut fr = start;
    let mut sr = start;
    for c in rest {
        if snode == 0 {
            // More proof than the new tree is tall.
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    // 6.
    snode == 0 && fr == *old_root && sr == *new_root
}

/// An incremental builder that keeps only O(log n) "frontier" nodes, for verifying a million records without holding every leaf:
///
/// after `n` pushes it holds the roots of the perfect subtrees that make up the tree of `n`
/// leaves, one per set bit of `n`, largest (leftmost) first. Those are exactly the subtrees
/// that RFC 9162's split into "largest power of two, then the rest" produces, so folding them
/// from the right gives the Merkle Tree Hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontier {
    /// Roots of the perfect subtrees, leftmost (largest) first; `len == size.count_ones()`.
    nodes: Vec<Hash>,
    /// How many leaves have been pushed.
    size: u64,
}

impl Frontier {
    /// An empty tree.
    pub fn new() -> Self {
        Frontier {
            nodes: Vec::with_capacity(64),
            size: 0,
        }
    }

    /// Appends one leaf hash (already leaf-hashed, as with [`leaf_hash`]).
    pub fn push(&mut self, leaf: Hash) {
        let mut merged = leaf;
        // Each trailing 1 bit of the old size is a perfect subtree of the same size as the
        // one being carried, which it now pairs with, like a binary increment.
        let mut carry = self.size;
        while carry & 1 == 1 {
            let Some(left) = self.nodes.pop() else {
                // Unreachable while the invariant holds; stop merging rather than panic.
                break;
            };
            merged = node_hash(&left, &merged);
            carry >>= 1;
        }
        self.nodes.push(merged);
        // 2^64 pushes cannot happen; saturate rather than overflow all the same.
        self.size = self.size.saturating_add(1);
    }

    /// How many leaves have been pushed.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The MTH of all leaves pushed so far (must equal root(&all_leaves)).
    pub fn root(&self) -> Hash {
        let mut subtrees = self.nodes.iter().rev();
        let Some(smallest) = subtrees.next() else {
            return empty_root();
        };
        subtrees.fold(*smallest, |acc, left| node_hash(left, &acc))
    }
}

impl Default for Frontier {
    fn default() -> Self {
        Self::new()
    }
}

/// A hash as 64 lowercase hexadecimal digits.
pub fn to_hex(hash: &Hash) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(64);
    for byte in hash {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// Parses 64 hexadecimal digits (as [`to_hex`] writes them; upper case is accepted too) into
/// a hash. None for any other length or any other character.
pub fn from_hex(text: &str) -> Option<Hash> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (out, pair) in hash.iter_mut().zip(bytes.chunks_exact(2)) {
        let [high, low] = pair else {
            return None;
        };
        *out = (hex_value(*high)? << 4) | hex_value(*low)?;
    }
    Some(hash)
}

/// The value of one hexadecimal digit.
fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    // ---------------------------------------------------------------------------------------
    // Reference data: the Certificate Transparency test tree (RFC 6962 / RFC 9162 hashing),
    // as published in transparency-dev/merkle's proof/verify_test.go and the
    // certificate-transparency implementations before it.
    // ---------------------------------------------------------------------------------------

    const REFERENCE_LEAVES: [&[u8]; 8] = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ];

    /// Roots of the reference tree for sizes 0..=8.
    const REFERENCE_ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    /// (0-based leaf index, tree size, audit path).
    const REFERENCE_INCLUSION: [(usize, usize, &[&str]); 5] = [
        (0, 1, &[]),
        (
            0,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            3,
            &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            1,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];

    /// (old size, new size, consistency proof).
    const REFERENCE_CONSISTENCY: [(usize, usize, &[&str]); 5] = [
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            6,
            7,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];

    fn reference_leaf_hashes() -> Vec<Hash> {
        REFERENCE_LEAVES
            .iter()
            .map(|data| leaf_hash(data))
            .collect()
    }

    fn hex(text: &str) -> Hash {
        from_hex(text).expect("test vector is 64 hex digits")
    }

    fn hexes(texts: &[&str]) -> Vec<Hash> {
        texts.iter().map(|text| hex(text)).collect()
    }

    /// Distinct leaf hashes for a test tree; `seed` varies the tree between proptest cases.
    fn leaves(n: usize, seed: u64) -> Vec<Hash> {
        (0..n as u64)
            .map(|i| leaf_hash(&[seed.to_be_bytes(), i.to_be_bytes()].concat()))
            .collect()
    }

    fn flip_bit(hash: &Hash, bit: usize) -> Hash {
        let mut flipped = *hash;
        flipped[(bit / 8) % 32] ^= 1 << (bit % 8);
        flipped
    }

    // ---------------------------------------------------------------------------------------
    // Independent models, written from the RFC's definitions in a different way from the code
    // under test, to check it against.
    // ---------------------------------------------------------------------------------------

    /// MTH computed bottom-up, level by level: pair neighbours, and carry an unpaired last
    /// node up unchanged. For RFC 9162's split this gives the same tree as the recursion.
    fn level_by_level_root(leaves: &[Hash]) -> Hash {
        if leaves.is_empty() {
            return hex(REFERENCE_ROOTS[0]);
        }
        let mut level = leaves.to_vec();
        while level.len() > 1 {
            level = level
                .chunks(2)
                .map(|pair| match pair {
                    [left, right] => node_hash(left, right),
                    [only] => *only,
                    _ => unreachable!(),
                })
                .collect();
        }
        level[0]
    }

    /// Which side each audit path element is on, deepest first (true = the sibling is on the
    /// right), from RFC 9162's recursive PATH definition. Two (index, size) pairs with the same
    /// shape fold the same proof into the same root, so the verifier cannot tell them apart;
    /// pairs with different shapes fold it differently. None when index >= size.
    fn path_shape(index: u64, size: u64) -> Option<Vec<bool>> {
        if index >= size {
            return None;
        }
        if size == 1 {
            return Some(Vec::new());
        }
        let k = 1u64 << (63 - (size - 1).leading_zeros());
        let mut shape;
        if index < k {
            shape = path_shape(index, k)?;
            shape.push(true);
        } else {
            shape = path_shape(index - k, size - k)?;
            shape.push(false);
        }
        Some(shape)
    }

    /// Folds an audit path up to a root along `path_shape`: inclusion verification written
    /// from the recursive definition rather than RFC 9162's iterative algorithm.
    fn fold_path(leaf: &Hash, shape: &[bool], proof: &[Hash]) -> Hash {
        shape
            .iter()
            .zip(proof)
            .fold(*leaf, |acc, (right, sibling)| {
                if *right {
                    node_hash(&acc, sibling)
                } else {
                    node_hash(sibling, &acc)
                }
            })
    }

    /// A symbolic hash: how a consistency proof's verifier must rebuild a root.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Sym {
        /// The old root the verifier is given.
        OldRoot,
        /// The i-th element of the proof.
        Proof(usize),
        Node(Box<Sym>, Box<Sym>),
    }

    fn sym_node(left: Sym, right: Sym) -> Sym {
        Sym::Node(Box::new(left), Box::new(right))
    }

    /// SUBPROOF(m, D[n], b) symbolically: returns (old subtree hash, new subtree hash) in
    /// terms of the proof elements, numbering them in proof order.
    fn sym_subproof(m: u64, n: u64, whole_old: bool, next: &mut usize) -> (Sym, Sym) {
        if m == n {
            if whole_old {
                return (Sym::OldRoot, Sym::OldRoot);
            }
            let slot = Sym::Proof(*next);
            *next += 1;
            return (slot.clone(), slot);
        }
        let k = 1u64 << (63 - (n - 1).leading_zeros());
        if m <= k {
            let (old, new) = sym_subproof(m, k, whole_old, next);
            let right = Sym::Proof(*next);
            *next += 1;
            (old, sym_node(new, right))
        } else {
            let (old, new) = sym_subproof(m - k, n - k, false, next);
            let left = Sym::Proof(*next);
            *next += 1;
            (sym_node(left.clone(), old), sym_node(left, new))
        }
    }

    /// The shape of a consistency proof: (proof length, old root, new root) as expressions
    /// over the proof. Size pairs with equal shapes accept the same proofs and roots; pairs
    /// with different shapes accept different ones. None where no proof exists.
    fn consistency_shape(old: u64, new: u64) -> Option<(usize, Sym, Sym)> {
        if old == 0 || old > new {
            return None;
        }
        let mut next = 0;
        let (old_root, new_root) = sym_subproof(old, new, true, &mut next);
        Some((next, old_root, new_root))
    }

    fn eval(sym: &Sym, old_root: &Hash, proof: &[Hash]) -> Hash {
        match sym {
            Sym::OldRoot => *old_root,
            Sym::Proof(i) => proof[*i],
            Sym::Node(left, right) => {
                node_hash(&eval(left, old_root, proof), &eval(right, old_root, proof))
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Known answers.
    // ---------------------------------------------------------------------------------------

    #[test]
    fn leaf_and_node_hashes_match_the_reference_tree() {
        let hashes = reference_leaf_hashes();
        // SHA-256(0x00) is both the hash of the empty leaf and the root of a one-leaf tree.
        assert_eq!(to_hex(&leaf_hash(b"")), REFERENCE_ROOTS[1]);
        assert_eq!(
            to_hex(&node_hash(&hashes[0], &hashes[1])),
            REFERENCE_ROOTS[2]
        );
        // The audit path of leaf 0 in the 8-leaf tree starts with leaf 1's hash.
        assert_eq!(
            to_hex(&hashes[1]),
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"
        );
    }

    #[test]
    fn roots_match_the_reference_roots_for_every_size() {
        let hashes = reference_leaf_hashes();
        for (size, expected) in REFERENCE_ROOTS.iter().enumerate() {
            assert_eq!(to_hex(&root(&hashes[..size])), *expected, "size {size}");
            let mut frontier = Frontier::new();
            for leaf in &hashes[..size] {
                frontier.push(*leaf);
            }
            assert_eq!(to_hex(&frontier.root()), *expected, "frontier size {size}");
        }
    }

    #[test]
    fn empty_tree_root_is_sha256_of_nothing() {
        assert_eq!(
            to_hex(&root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Frontier::new().root(), root(&[]));
        assert_eq!(Frontier::default().size(), 0);
    }

    #[test]
    fn inclusion_proofs_match_the_reference_paths() {
        let hashes = reference_leaf_hashes();
        for (index, size, expected) in REFERENCE_INCLUSION {
            let expected = hexes(expected);
            let proof = inclusion_proof(&hashes[..size], index).expect("index < size");
            assert_eq!(proof, expected, "leaf {index} of {size}");
            let root = hex(REFERENCE_ROOTS[size]);
            assert!(verify_inclusion(
                &hashes[index],
                index as u64,
                size as u64,
                &expected,
                &root
            ));
        }
    }

    #[test]
    fn consistency_proofs_match_the_reference_proofs() {
        let hashes = reference_leaf_hashes();
        for (old, new, expected) in REFERENCE_CONSISTENCY {
            let expected = hexes(expected);
            let proof = consistency_proof(&hashes[..new], old).expect("0 < old <= new");
            assert_eq!(proof, expected, "{old} -> {new}");
            assert!(
                verify_consistency(
                    old as u64,
                    new as u64,
                    &hex(REFERENCE_ROOTS[old]),
                    &hex(REFERENCE_ROOTS[new]),
                    &expected
                ),
                "{old} -> {new}"
            );
        }
    }

    #[test]
    fn split_is_the_largest_power_of_two_below_n_not_the_midpoint() {
        for (n, k) in [
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 4),
            (6, 4),
            (7, 4),
            (8, 4),
            (9, 8),
        ] {
            assert_eq!(split_point(n), k, "n = {n}");
        }
        assert_eq!(split_point(1000), 512);
        assert_eq!(split_point(1 << 20), 1 << 19);
        assert_eq!(split_point((1 << 20) + 1), 1 << 20);
        assert_eq!(split_point(usize::MAX), 1 << (usize::BITS - 1));
        // Derived by hand from the definition: 3 leaves are ((a, b), c), 5 are
        // (((a, b), (c, d)), e), and 6 are (((a, b), (c, d)), (e, f)).
        let l = leaves(6, 1);
        let ab = node_hash(&l[0], &l[1]);
        let cd = node_hash(&l[2], &l[3]);
        let ef = node_hash(&l[4], &l[5]);
        assert_eq!(root(&l[..3]), node_hash(&ab, &l[2]));
        assert_eq!(root(&l[..5]), node_hash(&node_hash(&ab, &cd), &l[4]));
        assert_eq!(root(&l[..6]), node_hash(&node_hash(&ab, &cd), &ef));
        assert_eq!(root(&l[..1]), l[0]);
    }

    #[test]
    fn domain_separation_keeps_leaves_and_nodes_apart() {
        let l = leaves(2, 2);
        let concatenated = [l[0], l[1]].concat();
        // An interior node's children, offered as one record, do not hash to the node.
        assert_ne!(leaf_hash(&concatenated), node_hash(&l[0], &l[1]));
        assert_ne!(root(&[leaf_hash(&concatenated)]), root(&l));
        // And neither prefix is the plain SHA-256 of the input.
        let plain: Hash = Sha256::digest(&concatenated).into();
        assert_ne!(plain, node_hash(&l[0], &l[1]));
        assert_ne!(Hash::from(Sha256::digest(b"x")), leaf_hash(b"x"));
        let mut with_prefix = vec![0x01];
        with_prefix.extend_from_slice(&concatenated);
        assert_eq!(
            Hash::from(Sha256::digest(&with_prefix)),
            node_hash(&l[0], &l[1])
        );
        assert_eq!(Hash::from(Sha256::digest([0x00, b'x'])), leaf_hash(b"x"));
    }

    // ---------------------------------------------------------------------------------------
    // Exhaustive small trees.
    // ---------------------------------------------------------------------------------------

    #[test]
    fn root_and_frontier_agree_with_the_level_by_level_model() {
        let all = leaves(300, 3);
        let mut frontier = Frontier::new();
        assert_eq!(frontier.root(), level_by_level_root(&[]));
        for size in 1..=all.len() {
            frontier.push(all[size - 1]);
            let expected = level_by_level_root(&all[..size]);
            assert_eq!(root(&all[..size]), expected, "size {size}");
            assert_eq!(frontier.root(), expected, "frontier size {size}");
            assert_eq!(frontier.size(), size as u64);
            assert_eq!(frontier.nodes.len() as u32, (size as u64).count_ones());
        }
    }

    #[test]
    fn every_inclusion_proof_of_every_tree_up_to_64_verifies() {
        let all = leaves(64, 4);
        for size in 1..=all.len() {
            let tree = &all[..size];
            let tree_root = root(tree);
            for index in 0..size {
                let proof = inclusion_proof(tree, index).expect("index < size");
                let shape = path_shape(index as u64, size as u64).expect("index < size");
                assert_eq!(proof.len(), shape.len(), "leaf {index} of {size}");
                assert_eq!(
                    fold_path(&tree[index], &shape, &proof),
                    tree_root,
                    "recursive fold, leaf {index} of {size}"
                );
                assert!(
                    verify_inclusion(&tree[index], index as u64, size as u64, &proof, &tree_root),
                    "leaf {index} of {size}"
                );
                // Another leaf's hash at this index is rejected.
                let other = tree[(index + 1) % size];
                if size > 1 {
                    assert!(!verify_inclusion(
                        &other,
                        index as u64,
                        size as u64,
                        &proof,
                        &tree_root
                    ));
                }
            }
            assert_eq!(inclusion_proof(tree, size), None);
        }
    }

    #[test]
    fn every_consistency_proof_between_trees_up_to_40_verifies() {
        let all = leaves(40, 5);
        let roots: Vec<Hash> = (0..=all.len()).map(|n| root(&all[..n])).collect();
        for new in 1..=all.len() {
            let tree = &all[..new];
            for old in 1..=new {
                let proof = consistency_proof(tree, old).expect("0 < old <= new");
                let (len, old_sym, new_sym) =
                    consistency_shape(old as u64, new as u64).expect("0 < old <= new");
                assert_eq!(proof.len(), len, "{old} -> {new}");
                assert_eq!(eval(&old_sym, &roots[old], &proof), roots[old]);
                assert_eq!(eval(&new_sym, &roots[old], &proof), roots[new]);
                assert!(
                    verify_consistency(old as u64, new as u64, &roots[old], &roots[new], &proof),
                    "{old} -> {new}"
                );
                if old < new {
                    assert!(!proof.is_empty());
                    // Not against the root of some other old tree.
                    let other_old = roots[old - 1];
                    assert!(!verify_consistency(
                        old as u64,
                        new as u64,
                        &other_old,
                        &roots[new],
                        &proof
                    ));
                } else {
                    assert!(proof.is_empty());
                }
            }
            assert_eq!(consistency_proof(tree, 0), None);
            assert_eq!(consistency_proof(tree, new + 1), None);
        }
    }

    #[test]
    fn equal_sizes_need_equal_roots_and_an_empty_proof() {
        let l = leaves(5, 6);
        let r = root(&l);
        assert!(verify_consistency(5, 5, &r, &r, &[]));
        assert!(!verify_consistency(5, 5, &r, &root(&l[..4]), &[]));
        assert!(!verify_consistency(5, 5, &r, &r, &[r]));
    }

    // ---------------------------------------------------------------------------------------
    // Degenerate input.
    // ---------------------------------------------------------------------------------------

    #[test]
    fn degenerate_inputs_give_none_or_false_and_never_panic() {
        let empty: [Hash; 0] = [];
        assert_eq!(inclusion_proof(&empty, 0), None);
        assert_eq!(inclusion_proof(&empty, usize::MAX), None);
        assert_eq!(consistency_proof(&empty, 0), None);
        assert_eq!(consistency_proof(&empty, 1), None);
        assert_eq!(consistency_proof(&leaves(3, 7), usize::MAX), None);
        assert_eq!(inclusion_proof(&leaves(1, 7), 0), Some(Vec::new()));
        assert_eq!(consistency_proof(&leaves(1, 7), 1), Some(Vec::new()));

        let h = leaf_hash(b"h");
        let junk: Vec<Hash> = (0..200u8).map(|i| leaf_hash(&[i])).collect();
        for size in [0, 1, 2, 3, u64::MAX - 1, u64::MAX] {
            for index in [0, 1, size / 2, size.saturating_sub(1), size, u64::MAX] {
                for len in [0, 1, 63, 64, 65, 200] {
                    // A tree of one leaf with an empty proof is the only way h is its own root.
                    let expected = size == 1 && index == 0 && len == 0;
                    assert_eq!(
                        verify_inclusion(&h, index, size, &junk[..len], &h),
                        expected,
                        "index {index} size {size} len {len}"
                    );
                }
            }
        }
        let r = root(&junk);
        for old in [0, 1, 2, 3, u64::MAX - 1, u64::MAX] {
            for new in [0, 1, 2, 3, u64::MAX - 1, u64::MAX] {
                for len in [0, 1, 63, 64, 65, 200] {
                    let expected = old == new && old != 0 && len == 0;
                    assert_eq!(
                        verify_consistency(old, new, &r, &r, &junk[..len]),
                        expected,
                        "{old} -> {new} len {len}"
                    );
                    assert!(!verify_consistency(old, new, &r, &h, &junk[..len]));
                }
            }
        }
        // An empty old tree is not something a proof is made or accepted for.
        assert!(!verify_consistency(0, 5, &root(&[]), &r, &[]));
    }

    #[test]
    fn hex_round_trips_and_rejects_anything_else() {
        let h = leaf_hash(b"round trip");
        let text = to_hex(&h);
        assert_eq!(text.len(), 64);
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(from_hex(&text), Some(h));
        assert_eq!(from_hex(&text.to_uppercase()), Some(h));
        assert_eq!(to_hex(&[0u8; 32]), "0".repeat(64));
        assert_eq!(to_hex(&[0xffu8; 32]), "f".repeat(64));
        let mut counting = [0u8; 32];
        for (i, byte) in counting.iter_mut().enumerate() {
            *byte = i as u8 * 8;
        }
        assert_eq!(
            to_hex(&counting),
            "0008101820283038404850586068707880889098a0a8b0b8c0c8d0d8e0e8f0f8"
        );
        assert_eq!(from_hex(&to_hex(&counting)), Some(counting));

        assert_eq!(from_hex(""), None);
        assert_eq!(from_hex(&text[..62]), None);
        assert_eq!(from_hex(&format!("{text}00")), None);
        assert_eq!(from_hex(&format!("{}g", &text[..63])), None);
        assert_eq!(from_hex(&format!(" {}", &text[..63])), None);
        assert_eq!(from_hex(&format!("+{}", &text[..63])), None);
        // 64 bytes, but not 64 hex digits: 32 two-byte characters.
        assert_eq!(from_hex(&"é".repeat(32)), None);
        assert_eq!(from_hex(&format!("é{}", &text[..62])), None);
    }

    // ---------------------------------------------------------------------------------------
    // Tampering, on random trees.
    // ---------------------------------------------------------------------------------------

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn tampered_inclusion_proofs_are_rejected(
            n in 1usize..=200,
            seed in any::<u64>(),
            pick in any::<Index>(),
            other in any::<Index>(),
            element in any::<Index>(),
            bit in 0usize..256,
            garbage in any::<[u8; 32]>(),
        ) {
            let tree = leaves(n, seed);
            let tree_root = root(&tree);
            let index = pick.index(n);
            let leaf = tree[index];
            let proof = inclusion_proof(&tree, index).expect("index < n");
            let (i, size) = (index as u64, n as u64);
            prop_assert!(verify_inclusion(&leaf, i, size, &proof, &tree_root));

            // Any bit of any element flipped.
            if !proof.is_empty() {
                let at = element.index(proof.len());
                let mut bad = proof.clone();
                bad[at] = flip_bit(&bad[at], bit);
                prop_assert!(!verify_inclusion(&leaf, i, size, &bad, &tree_root));
            }
            // An element dropped, anywhere.
            if !proof.is_empty() {
                let mut bad = proof.clone();
                bad.remove(element.index(proof.len()));
                prop_assert!(!verify_inclusion(&leaf, i, size, &bad, &tree_root));
            }
            // An element appended, or inserted anywhere.
            for extra in [garbage, tree_root, leaf] {
                let mut bad = proof.clone();
                bad.push(extra);
                prop_assert!(!verify_inclusion(&leaf, i, size, &bad, &tree_root));
                let mut bad = proof.clone();
                bad.insert(element.index(proof.len() + 1), extra);
                prop_assert!(!verify_inclusion(&leaf, i, size, &bad, &tree_root));
            }
            // A wrong index: every other leaf position of a tree has a different path.
            if n > 1 {
                let wrong = (index + 1 + other.index(n - 1)) % n;
                prop_assert!(!verify_inclusion(&leaf, wrong as u64, size, &proof, &tree_root));
            }
            for wrong in [i.wrapping_sub(1), i + 1, i ^ 2, size, u64::MAX] {
                if wrong != i {
                    prop_assert!(!verify_inclusion(&leaf, wrong, size, &proof, &tree_root));
                }
            }
            // A wrong tree size. A size whose path for this index has the same shape folds the
            // proof identically, so it verifies (RFC 9162 cannot tell those apart: e.g. leaf 0
            // of 5 and of 6 both have the path [leaf 1, (2,3), right subtree]); every other
            // size must be rejected.
            let own_shape = path_shape(i, size);
            for wrong in [size - 1, size + 1, size * 2, size / 2, u64::MAX] {
                if wrong != size {
                    let same_shape = path_shape(i, wrong) == own_shape;
                    prop_assert_eq!(
                        verify_inclusion(&leaf, i, wrong, &proof, &tree_root),
                        same_shape,
                        "size {} -> {}", size, wrong
                    );
                }
            }
            // A wrong root, a wrong leaf.
            prop_assert!(!verify_inclusion(&leaf, i, size, &proof, &garbage));
            prop_assert!(!verify_inclusion(&leaf, i, size, &proof, &flip_bit(&tree_root, bit)));
            prop_assert!(!verify_inclusion(&leaf, i, size, &proof, &root(&[])));
            prop_assert!(!verify_inclusion(&flip_bit(&leaf, bit), i, size, &proof, &tree_root));
            prop_assert!(!verify_inclusion(&garbage, i, size, &proof, &tree_root));
        }

        #[test]
        fn tampered_consistency_proofs_are_rejected(
            n in 1usize..=200,
            seed in any::<u64>(),
            pick in any::<Index>(),
            element in any::<Index>(),
            bit in 0usize..256,
            garbage in any::<[u8; 32]>(),
        ) {
            let tree = leaves(n, seed);
            let old = 1 + pick.index(n);
            let old_root = root(&tree[..old]);
            let new_root = root(&tree);
            let proof = consistency_proof(&tree, old).expect("0 < old <= n");
            let (m, size) = (old as u64, n as u64);
            prop_assert!(verify_consistency(m, size, &old_root, &new_root, &proof));

            // Any bit of any element flipped.
            if !proof.is_empty() {
                let at = element.index(proof.len());
                let mut bad = proof.clone();
                bad[at] = flip_bit(&bad[at], bit);
                prop_assert!(!verify_consistency(m, size, &old_root, &new_root, &bad));
            }
            // An element dropped, anywhere.
            if !proof.is_empty() {
                let mut bad = proof.clone();
                bad.remove(element.index(proof.len()));
                prop_assert!(!verify_consistency(m, size, &old_root, &new_root, &bad));
            }
            // An element appended, or inserted anywhere.
            for extra in [garbage, old_root, new_root] {
                let mut bad = proof.clone();
                bad.push(extra);
                prop_assert!(!verify_consistency(m, size, &old_root, &new_root, &bad));
                let mut bad = proof.clone();
                bad.insert(element.index(proof.len() + 1), extra);
                prop_assert!(!verify_consistency(m, size, &old_root, &new_root, &bad));
            }
            // Wrong roots: garbage, tampered, swapped.
            prop_assert!(!verify_consistency(m, size, &garbage, &new_root, &proof));
            prop_assert!(!verify_consistency(m, size, &old_root, &garbage, &proof));
            prop_assert!(!verify_consistency(
                m, size, &flip_bit(&old_root, bit), &new_root, &proof
            ));
            prop_assert!(!verify_consistency(
                m, size, &old_root, &flip_bit(&new_root, bit), &proof
            ));
            if old < n {
                prop_assert!(!verify_consistency(m, size, &new_root, &old_root, &proof));
                // Swapped sizes: time running backwards.
                prop_assert!(!verify_consistency(size, m, &old_root, &new_root, &proof));
                prop_assert!(!verify_consistency(size, m, &new_root, &old_root, &proof));
                // No proof at all.
                prop_assert!(!verify_consistency(m, size, &old_root, &new_root, &[]));
            }
            // Wrong sizes. As with inclusion, a size pair whose proof has the same shape (the
            // same length, and the same expressions for both roots) accepts the same proof,
            // e.g. 2 -> 5 and 2 -> 6 are both [(2,3), right subtree]; any other pair must not.
            let own_shape = consistency_shape(m, size);
            let olds = [m - 1, m + 1, m ^ 2, m * 2, m / 2];
            let news = [size - 1, size + 1, size * 2, size / 2];
            let pairs = olds
                .iter()
                .map(|&o| (o, size))
                .chain(news.iter().map(|&s| (m, s)))
                .chain([(m - 1, size - 1), (m + 1, size + 1), (0, size), (m, 0), (m, u64::MAX)]);
            for (wrong_old, wrong_new) in pairs {
                if (wrong_old, wrong_new) != (m, size) {
                    let same_shape = consistency_shape(wrong_old, wrong_new) == own_shape;
                    prop_assert_eq!(
                        verify_consistency(wrong_old, wrong_new, &old_root, &new_root, &proof),
                        same_shape,
                        "{} -> {} as {} -> {}", m, size, wrong_old, wrong_new
                    );
                }
            }
        }

        #[test]
        fn frontier_matches_root_for_random_trees(n in 0usize..=300, seed in any::<u64>()) {
            let tree = leaves(n, seed);
            let mut frontier = Frontier::default();
            for leaf in &tree {
                frontier.push(*leaf);
            }
            prop_assert_eq!(frontier.size(), n as u64);
            prop_assert_eq!(frontier.root(), root(&tree));
        }
    }

    // ---------------------------------------------------------------------------------------
    // Timing (run with: cargo test --release -- --ignored --nocapture frontier_throughput).
    // ---------------------------------------------------------------------------------------

    #[test]
    #[ignore = "timing only; run explicitly in release"]
    fn frontier_throughput_over_a_million_records() {
        use std::time::Instant;
        const RECORDS: u64 = 1_000_000;
        // A record of a typical audit line's size, with the sequence number varying it.
        let mut record = vec![b'a'; 256];
        let start = Instant::now();
        let mut frontier = Frontier::new();
        for sequence in 0..RECORDS {
            record[..8].copy_from_slice(&sequence.to_be_bytes());
            frontier.push(leaf_hash(&record));
        }
        let frontier_root = frontier.root();
        let elapsed = start.elapsed();
        println!(
            "Frontier: {RECORDS} records of {} bytes (leaf hash + push + root) in {:.3} s: \
             {:.0} records/s; {} frontier nodes held",
            record.len(),
            elapsed.as_secs_f64(),
            RECORDS as f64 / elapsed.as_secs_f64(),
            frontier.nodes.len()
        );
        // Same root as the recursive MTH over all the leaves.
        let leaves: Vec<Hash> = (0..RECORDS)
            .map(|sequence| {
                record[..8].copy_from_slice(&sequence.to_be_bytes());
                leaf_hash(&record)
            })
            .collect();
        let start = Instant::now();
        assert_eq!(root(&leaves), frontier_root);
        println!(
            "root() over {RECORDS} leaf hashes (nodes only): {:.3} s",
            start.elapsed().as_secs_f64()
        );
    }
}
