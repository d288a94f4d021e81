//! A parsed BTF blob as the converter walks it: types by id, byte order, decl tags.

use std::collections::HashMap;

use btf_rs::{Btf, BtfType, Type};

use super::{ConvertError, Result};
use crate::btf_fmt::TypedBtf;

/// Longest typedef/modifier chain and deepest nesting followed (corrupt BTF can loop).
pub(crate) const MAX_DEPTH: usize = 64;

/// Kernel-managed special structs: the kernel refuses or ignores user-space values for
/// them, so a converted value leaves them zero.
const KERNEL_STRUCTS: &[&str] = &[
    "bpf_spin_lock",
    "bpf_res_spin_lock",
    "bpf_timer",
    "bpf_wq",
    "bpf_task_work",
    "bpf_list_head",
    "bpf_list_node",
    "bpf_rb_root",
    "bpf_rb_node",
    "bpf_refcount",
];

/// Type tags that make a pointer a kernel-managed kptr.
const KPTR_TAGS: &[&str] = &["kptr", "kptr_untrusted", "kptr_ref", "percpu_kptr", "rcu"];

/// One BTF graph (the snapshot's or the target map's).
pub struct BtfGraph {
    btf: Btf,
    typed: TypedBtf,
    big_endian: bool,
    max_id: u32,
    /// Decl tag strings by (tagged type id, member index or -1 for the type itself).
    tags: HashMap<(u32, i64), Vec<String>>,
}

impl std::fmt::Debug for BtfGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BtfGraph")
            .field("big_endian", &self.big_endian)
            .field("max_id", &self.max_id)
            .field("decl_tags", &self.tags.len())
            .finish_non_exhaustive()
    }
}

/// A type with typedefs and modifiers looked through.
pub(crate) struct Resolved {
    pub id: u32,
    pub ty: Type,
    /// Typedef ids passed on the way (their decl tags apply to the value).
    pub typedefs: Vec<u32>,
}

impl BtfGraph {
    /// Parse a raw BTF blob (a map's BTF from the kernel, a snapshot's, or an object's
    /// `.BTF` section; see [`super::btf_from_elf`]).
    pub fn parse(blob: &[u8]) -> Result<Self> {
        // TypedBtf checks the header bounds that btf-rs trusts, and names types for us.
        let typed = TypedBtf::parse(blob)?;
        let btf = Btf::from_bytes(blob).map_err(|e| ConvertError::Btf(e.to_string()))?;
        let big_endian = blob.first() == Some(&0xeb);
        let max_id = btf.base().type_id_range().1;
        let mut tags: HashMap<(u32, i64), Vec<String>> = HashMap::new();
        for id in 1..=max_id {
            if let Ok(Type::DeclTag(t)) = btf.resolve_type_by_id(id) {
                let target = t.get_type_id().unwrap_or(0);
                let idx = t.component_index().map_or(-1, i64::from);
                let name = btf.resolve_name(&t).unwrap_or_default();
                tags.entry((target, idx)).or_default().push(name);
            }
        }
        Ok(Self {
            btf,
            typed,
            big_endian,
            max_id,
            tags,
        })
    }

    /// Whether values are big-endian (BTF from s390x and the like).
    pub fn big_endian(&self) -> bool {
        self.big_endian
    }

    /// Id of the struct, union, enum or typedef called `name` (`"conn"`, or with a kind
    /// prefix: `"struct conn"`, `"union u"`, `"enum e"`). Structs win over other kinds
    /// when the bare name is ambiguous.
    pub fn find_type(&self, name: &str) -> Result<u32> {
        let (kind, bare) = match name.split_once(' ') {
            Some((k @ ("struct" | "union" | "enum"), rest)) => (Some(k), rest.trim()),
            _ => (None, name),
        };
        let ids = self.btf.resolve_ids_by_name(bare).unwrap_or_default();
        let kind_of = |id: &u32| match self.btf.resolve_type_by_id(*id) {
            Ok(Type::Struct(_)) => 0,
            Ok(Type::Union(_)) => 1,
            Ok(Type::Enum(_) | Type::Enum64(_)) => 2,
            Ok(Type::Typedef(_)) => 3,
            _ => 9,
        };
        let want = match kind {
            Some("struct") => Some(0),
            Some("union") => Some(1),
            Some("enum") => Some(2),
            _ => None,
        };
        ids.iter()
            .filter(|id| kind_of(id) < 9 && want.is_none_or(|w| kind_of(id) == w))
            .min_by_key(|id| kind_of(id))
            .copied()
            .ok_or_else(|| ConvertError::NoSuchType {
                name: name.to_string(),
            })
    }

    /// Key and value type ids of the BTF-defined map `name` in an object's `.maps`
    /// section (`struct { __type(key, K); __type(value, V); ... } name SEC(".maps")`).
    /// A map declared with `key_size` instead of a key type has key id 0.
    pub fn map_types(&self, name: &str) -> Result<(u32, u32)> {
        let none = || ConvertError::NoSuchType {
            name: format!("map {name} (a BTF-defined map in the object's .maps section)"),
        };
        let ids = self.btf.resolve_ids_by_name(name).unwrap_or_default();
        let var = ids
            .iter()
            .find(|id| matches!(self.btf.resolve_type_by_id(**id), Ok(Type::Var(_))))
            .ok_or_else(none)?;
        let def = self.resolve(chained(&self.ty(*var)?))?;
        let Type::Struct(s) = &def.ty else {
            return Err(none());
        };
        let mut out = (0, 0);
        for m in &s.members {
            let slot = match self.name(m).as_str() {
                "key" => &mut out.0,
                "value" => &mut out.1,
                _ => continue,
            };
            // `__type(key, K)` is `typeof(K) *key`: the pointee is the type.
            let t = self.ty(m.get_type_id().unwrap_or(0))?;
            if let Type::Ptr(_) = t {
                *slot = chained(&t);
            }
        }
        if out.1 == 0 {
            return Err(ConvertError::NoBtf {
                what: format!("map {name} in the object (it has no value type)"),
            });
        }
        Ok(out)
    }

    /// C-like name of a type, for the plan and errors.
    pub fn type_name(&self, id: u32) -> String {
        self.typed
            .type_name(id)
            .unwrap_or_else(|_| format!("type #{id}"))
    }

    /// Size in bytes of a value of the type.
    pub fn size_of(&self, id: u32) -> Result<usize> {
        Ok(self.typed.type_size(id)?)
    }

    pub(crate) fn ty(&self, id: u32) -> Result<Type> {
        self.btf
            .resolve_type_by_id(id)
            .map_err(|_| ConvertError::Btf(format!("unknown type id {id} (max {})", self.max_id)))
    }

    pub(crate) fn name(&self, t: &dyn BtfType) -> String {
        self.btf.resolve_name(t).unwrap_or_default()
    }

    /// Decl tags on type `id` (member `idx`, or the type itself with -1).
    pub(crate) fn tags(&self, id: u32, idx: i64) -> &[String] {
        self.tags.get(&(id, idx)).map_or(&[], Vec::as_slice)
    }

    /// Look through typedefs, const, volatile, restrict and type tags.
    pub(crate) fn resolve(&self, mut id: u32) -> Result<Resolved> {
        let mut typedefs = Vec::new();
        for _ in 0..MAX_DEPTH {
            let ty = self.ty(id)?;
            match ty {
                Type::Typedef(_) => {
                    typedefs.push(id);
                    id = chained(&ty);
                }
                Type::Const(_) | Type::Volatile(_) | Type::Restrict(_) | Type::TypeTag(_) => {
                    id = chained(&ty);
                }
                _ => return Ok(Resolved { id, ty, typedefs }),
            }
        }
        Err(ConvertError::Btf(format!(
            "type id {id}: typedef/modifier chain longer than {MAX_DEPTH}"
        )))
    }

    /// Whether the type is a kernel-managed struct (`bpf_spin_lock`, `bpf_timer`, ...) or a
    /// kptr (a pointer whose target carries a `kptr`-like type tag).
    pub(crate) fn kernel_managed(&self, r: &Resolved) -> Option<String> {
        match &r.ty {
            Type::Struct(s) => {
                let name = self.name(s);
                KERNEL_STRUCTS
                    .contains(&name.as_str())
                    .then(|| format!("struct {name}"))
            }
            Type::Ptr(_) => {
                let mut id = chained(&r.ty);
                for _ in 0..MAX_DEPTH {
                    let t = self.ty(id).ok()?;
                    match &t {
                        Type::TypeTag(tt) => {
                            let tag = self.name(tt);
                            if KPTR_TAGS.contains(&tag.as_str()) {
                                return Some(format!("{tag} pointer"));
                            }
                        }
                        Type::Const(_) | Type::Volatile(_) | Type::Restrict(_) => {}
                        _ => return None,
                    }
                    id = chained(&t);
                }
                None
            }
            _ => None,
        }
    }
}

/// The type a BTF type refers to; 0 (void) if none.
pub(crate) fn chained(t: &Type) -> u32 {
    t.as_btf_type().and_then(|b| b.get_type_id()).unwrap_or(0)
}
