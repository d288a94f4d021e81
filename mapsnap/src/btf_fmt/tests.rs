#![allow(clippy::unwrap_used)] // tests may panic on setup failures

use proptest::prelude::*;
use serde_json::json;

use super::*;

// Built by tests/fixtures/btf/regen.sh from types.bpf.c (see there).
const BTF_LE: &[u8] = include_bytes!("../../tests/fixtures/btf/types.btf");
const BTF_BE: &[u8] = include_bytes!("../../tests/fixtures/btf/types_be.btf");
// Compiler-initialised bytes of the globals g_all / g_key: layout and byte-order oracle.
const ALL_KINDS_LE: &[u8] = include_bytes!("../../tests/fixtures/btf/all_kinds.le.bin");
const ALL_KINDS_BE: &[u8] = include_bytes!("../../tests/fixtures/btf/all_kinds.be.bin");
const FLOW_KEY_LE: &[u8] = include_bytes!("../../tests/fixtures/btf/flow_key.le.bin");
const FLOW_KEY_BE: &[u8] = include_bytes!("../../tests/fixtures/btf/flow_key.be.bin");
// `bpftool -j map dump` of the .data map of types.bpf.c built without the fields the
// kernel or bpftool reject (bpf_spin_lock in global data, floats); see regen.sh.
const BPFTOOL_DATA: &str = include_str!("../../tests/fixtures/btf/bpftool_data.json");

fn le() -> TypedBtf {
    TypedBtf::parse(BTF_LE).unwrap()
}

fn be() -> TypedBtf {
    TypedBtf::parse(BTF_BE).unwrap()
}

/// Id of the only type called `name`.
fn id_of(tb: &TypedBtf, name: &str) -> u32 {
    let ids = tb.btf.resolve_ids_by_name(name).unwrap();
    assert_eq!(ids.len(), 1, "{name}: {ids:?}");
    ids[0]
}

/// Type id of member `member` of struct `strukt`.
fn member_type(tb: &TypedBtf, strukt: &str, member: &str) -> u32 {
    let Type::Struct(s) = tb.ty(id_of(tb, strukt)).unwrap() else {
        panic!("{strukt} is not a struct");
    };
    let m = s.members.iter().find(|m| tb.name(*m) == member).unwrap();
    m.get_type_id().unwrap()
}

/// Compact JSON text: compares key order too (Map equality ignores it).
fn text(v: &Value) -> String {
    serde_json::to_string(v).unwrap()
}

fn expected_all_kinds() -> Value {
    json!({
        "u8f": 171,
        "u16f": 48879,
        "u32f": 3735928559u32,
        "u64f": 81985529216486895u64,
        "s8f": -5,
        "s16f": -300,
        "s32f": -70000,
        "s64f": -5000000000i64,
        "flag": true,
        "c": 65,
        "name": "hello",
        "raw": [1, 2, 3, 250],
        "tchars": [97, 98, 99, 0],
        "in": {"port": 8080, "delta": -2},
        "num": {"whole": 8589934593u64, "halves": {"a": 1, "b": 2}},
        "pairs": [{"a": 1, "b": 2}, {"a": 3, "b": 4}],
        "color": "BLUE",
        "tiny": "TINY_B",
        "bf_a": 5,
        "bf_b": 17,
        "bf_c": -3,
        "bf_d": 0xabcde,
        "bf_e": "GREEN",
        "bf_f": true,
        "ptr": "0xffff888012345678",
        "uptr": "0x7fff0000",
        "cv": 42,
        "f32": 1.5,
        "f64": -2.25,
        "u128": "0x10000000000000002",
        "s128": "0xffffffffffffffffffffffffffffffff",
        "x": 7,
        "y": 8,
        "alias_u": 4294967295u32,
        "alias_s": -1,
        "matrix": [[1, 2, 3], [4, 5, 6]],
        "lock": {"val": 0},
        "timer": {"__opaque": [0, 0]}
    })
}

#[test]
fn renders_every_field_kind_little_endian() {
    let tb = le();
    let v = tb.render(id_of(&tb, "all_kinds"), ALL_KINDS_LE).unwrap();
    assert_eq!(text(&v), text(&expected_all_kinds()));
}

#[test]
fn renders_big_endian_btf_in_its_byte_order() {
    let tb = be();
    assert!(tb.big_endian);
    let v = tb.render(id_of(&tb, "all_kinds"), ALL_KINDS_BE).unwrap();
    // Same values, except that the union's halves overlay the u64 the other way.
    let mut want = expected_all_kinds();
    want["num"]["halves"] = json!({"a": 2, "b": 1});
    assert_eq!(text(&v), text(&want));
}

#[test]
fn renders_flow_key_and_text() {
    for (tb, bytes) in [(le(), FLOW_KEY_LE), (be(), FLOW_KEY_BE)] {
        let v = tb.render(id_of(&tb, "flow_key"), bytes).unwrap();
        assert_eq!(
            text(&v),
            r#"{"src":167772161,"dst":167772162,"sport":1234,"dport":80,"proto":6,"pad":[0,0,0]}"#
        );
        assert_eq!(
            to_text(&v),
            "{src: 167772161, dst: 167772162, sport: 1234, dport: 80, proto: 6, pad: [0, 0, 0]}"
        );
    }
}

#[test]
fn matches_bpftool_output_up_to_documented_differences() {
    let dump: Value = serde_json::from_str(BPFTOOL_DATA).unwrap();
    let data = &dump[0]["formatted"]["value"][".data"];
    let raw: Vec<u8> = dump[0]["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
        .collect();
    let tb = le();

    // bpftool's g_all, turned into what we print (the JSON parser keeps only the last
    // of bpftool's two "" keys, so the anonymous struct x/y is checked on our side).
    let mut theirs = data[0]["g_all"].as_object().unwrap().clone();
    for k in ["bf_a", "bf_b", "bf_c", "bf_d", "bf_e", "bf_f"] {
        // bpftool: every bitfield as a hex string.
        let hex = theirs[k].as_str().unwrap();
        let n = u64::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap();
        theirs[k] = match k {
            "bf_c" => json!(sign_extend(n.into(), 4) as i64),
            "bf_e" => json!(["RED", "GREEN", "BLUE"][n as usize]),
            "bf_f" => json!(n != 0),
            _ => json!(n),
        };
    }
    for k in ["ptr", "uptr"] {
        // bpftool -j: pointers in decimal.
        theirs[k] = json!(format!("{:#x}", theirs[k].as_u64().unwrap()));
    }
    // bpftool compares a 1-byte unsigned enum sign-extended, so 200 misses TINY_B.
    assert_eq!(theirs["tiny"], json!(-56));
    theirs["tiny"] = json!("TINY_B");
    let anon = theirs.shift_remove("").unwrap(); // anonymous union, flattened by us
    let anon_pos = theirs.keys().position(|k| k == "matrix").unwrap();
    for (i, (k, v)) in anon.as_object().unwrap().iter().enumerate() {
        theirs.shift_insert(anon_pos + i, k.clone(), v.clone());
    }

    // Ours, from the full fixture: drop what the bpftool build of the struct lacks.
    let mut ours = expected_all_kinds();
    let obj = ours.as_object_mut().unwrap();
    for k in ["f32", "f64", "lock", "x", "y"] {
        obj.shift_remove(k);
    }
    assert_eq!(text(&Value::Object(theirs)), text(&ours));
    assert_eq!(
        text(&tb.render(id_of(&tb, "all_kinds"), ALL_KINDS_LE).unwrap()["in"]),
        text(&data[0]["g_all"]["in"])
    );

    // The other globals render exactly as bpftool's, from the map's own bytes.
    // Offsets are those of the loaded map (the .o's DATASEC has them all at 0).
    let g_key = tb.render(id_of(&tb, "flow_key"), &raw[208..]).unwrap();
    assert_eq!(text(&g_key), text(&data[1]["g_key"]));
    let label = tb.render(id_of(&tb, "g_label"), &raw[224..]).unwrap();
    assert_eq!(text(&label), text(&data[2]));
    let noterm = tb.render(id_of(&tb, "g_noterm"), &raw[232..]).unwrap();
    assert_eq!(text(&noterm), text(&data[3]));
}

#[test]
fn char_arrays_render_as_strings_only_when_terminated_and_printable() {
    let tb = le();
    let name = member_type(&tb, "all_kinds", "name"); // char[16]
    let mut b = [0u8; 16];
    assert_eq!(tb.render(name, &b).unwrap(), json!(""));
    b[..5].copy_from_slice(b"a \"b\"");
    assert_eq!(tb.render(name, &b).unwrap(), json!("a \"b\""));
    b[1] = 0x07; // not printable: all 16 as numbers
    let arr = tb.render(name, &b).unwrap();
    assert_eq!(arr.as_array().unwrap().len(), 16);
    assert_eq!(arr[1], json!(7));
    b[1] = 0xe9; // char is signed in this BTF
    assert_eq!(tb.render(name, &b).unwrap()[1], json!(-23));
    let full = [b'x'; 16]; // no NUL
    assert_eq!(tb.render(name, &full).unwrap()[15], json!(120));
    // unsigned char and typedef'd char are never strings (bpftool's rule).
    let raw = member_type(&tb, "all_kinds", "raw");
    assert_eq!(tb.render(raw, b"ab\0\0").unwrap(), json!([97, 98, 0, 0]));
    let tchars = member_type(&tb, "all_kinds", "tchars");
    assert_eq!(tb.render(tchars, b"ab\0\0").unwrap(), json!([97, 98, 0, 0]));
}

#[test]
fn enums_fall_back_to_numbers() {
    let tb = le();
    let color = id_of(&tb, "color");
    assert_eq!(
        tb.render(color, &2u32.to_le_bytes()).unwrap(),
        json!("BLUE")
    );
    assert_eq!(
        tb.render(color, &u32::MAX.to_le_bytes()).unwrap(),
        json!("NEG")
    );
    // clang 14 does not mark enums signed: unmatched values print unsigned.
    assert_eq!(tb.render(color, &7u32.to_le_bytes()).unwrap(), json!(7));
    let tiny = id_of(&tb, "tiny");
    assert_eq!(tb.render(tiny, &[200]).unwrap(), json!("TINY_B"));
    assert_eq!(tb.render(tiny, &[3]).unwrap(), json!(3));
}

#[test]
fn type_names_and_sizes() {
    let tb = le();
    let all = id_of(&tb, "all_kinds");
    assert_eq!(tb.type_name(all).unwrap(), "struct all_kinds");
    assert_eq!(tb.type_size(all).unwrap(), 240);
    assert_eq!(
        tb.type_name(id_of(&tb, "flow_key")).unwrap(),
        "struct flow_key"
    );
    assert_eq!(tb.type_size(id_of(&tb, "flow_key")).unwrap(), 16);
    let cases = [
        ("u32f", "__u32", 4),
        ("name", "char[16]", 16),
        ("matrix", "int[2][3]", 24),
        ("pairs", "struct pair[2]", 16),
        ("ptr", "void *", 8),
        ("uptr", "__u32 *", 8),
        ("cv", "const volatile my_u32", 4),
        ("num", "union num", 8),
        ("color", "enum color", 4),
        ("tiny", "enum tiny", 1),
        ("f64", "double", 8),
        ("u128", "unsigned __int128", 16),
        ("lock", "struct bpf_spin_lock", 4),
        ("timer", "struct bpf_timer", 16),
    ];
    for (member, name, size) in cases {
        let id = member_type(&tb, "all_kinds", member);
        assert_eq!(tb.type_name(id).unwrap(), name, "{member}");
        assert_eq!(tb.type_size(id).unwrap(), size, "{member}");
    }
    assert_eq!(tb.type_name(0).unwrap(), "void");
    assert_eq!(tb.type_name(id_of(&tb, ".data")).unwrap(), ".data");
}

#[test]
fn errors_name_the_type_and_sizes() {
    let tb = le();
    let all = id_of(&tb, "all_kinds");
    let err = tb.render(all, &ALL_KINDS_LE[..239]).unwrap_err();
    assert!(matches!(
        err,
        BtfFmtError::ShortValue {
            need: 240,
            got: 239,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        format!("BTF type id {all} (struct all_kinds) needs 240 bytes, got 239")
    );

    let err = tb.render(100_000, &[]).unwrap_err();
    assert!(matches!(err, BtfFmtError::UnknownType { id: 100_000, .. }));
    assert!(err.to_string().contains("100000"), "{err}");
    assert!(tb.type_name(100_000).is_err());
    assert!(tb.type_size(100_000).is_err());

    let err = tb.render(0, &[0; 8]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "BTF type id 0 (void) is a void, which has no value representation"
    );
    let prog = id_of(&tb, "prog");
    assert!(matches!(
        tb.render(prog, &[0; 8]),
        Err(BtfFmtError::Unsupported { kind: "func", .. })
    ));
}

#[test]
fn rejects_bad_blobs() {
    for blob in [&b""[..], b"\x9f\xeb", b"not btf at all, not btf at all"] {
        let err = TypedBtf::parse(blob).unwrap_err();
        assert!(matches!(err, BtfFmtError::InvalidBlob { .. }), "{err}");
    }
    // Header claims more strings than there are.
    let mut blob = BTF_LE.to_vec();
    blob[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = TypedBtf::parse(&blob).unwrap_err();
    assert!(
        err.to_string().contains(&format!("{} bytes", blob.len())),
        "{err}"
    );
    // Truncated type section.
    assert!(TypedBtf::parse(&BTF_LE[..BTF_LE.len() / 2]).is_err());
}

#[test]
fn hex_and_text_helpers() {
    assert_eq!(
        render_hex(&[0, 0x0a, 0xff]),
        json!(["0x00", "0x0a", "0xff"])
    );
    assert_eq!(render_hex(&[]), json!([]));
    let v = json!({
        "src": 10, "name": "a\"b\n", "(anon#2)": [true, null, 1.5], ".bss": {}, "_x9": -1
    });
    assert_eq!(
        to_text(&v),
        r#"{src: 10, name: "a\"b\n", "(anon#2)": [true, null, 1.5], ".bss": {}, _x9: -1}"#
    );
}

/// Minimal BTF writer for kinds and corner cases clang 14 does not emit.
struct Builder {
    types: Vec<u8>,
    strs: Vec<u8>,
    next_id: u32,
}

/// A struct member: name, type, bit offset, bitfield size (0: none).
type M<'a> = (&'a str, u32, u32, u32);

impl Builder {
    fn new() -> Self {
        Builder {
            types: Vec::new(),
            strs: vec![0],
            next_id: 1,
        }
    }

    fn s(&mut self, name: &str) -> u32 {
        if name.is_empty() {
            return 0;
        }
        let off = self.strs.len() as u32;
        self.strs.extend(name.as_bytes());
        self.strs.push(0);
        off
    }

    fn raw(
        &mut self,
        name: &str,
        kind: u32,
        kflag: bool,
        vlen: u32,
        st: u32,
        extra: &[u32],
    ) -> u32 {
        let name_off = self.s(name);
        let info = (u32::from(kflag) << 31) | (kind << 24) | vlen;
        for w in [name_off, info, st].iter().chain(extra) {
            self.types.extend(w.to_le_bytes());
        }
        self.next_id += 1;
        self.next_id - 1
    }

    fn int(&mut self, name: &str, size: u32, encoding: u32) -> u32 {
        self.raw(name, 1, false, 0, size, &[(encoding << 24) | (size * 8)])
    }

    fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
        self.raw("", 3, false, 0, 0, &[elem, index, n])
    }

    fn record(&mut self, union: bool, name: &str, size: u32, members: &[M<'_>]) -> u32 {
        let kflag = members.iter().any(|m| m.3 > 0);
        let mut extra = Vec::new();
        for &(n, ty, off, bits) in members {
            extra.extend([self.s(n), ty, off | (bits << 24)]);
        }
        let kind = if union { 5 } else { 4 };
        self.raw(name, kind, kflag, members.len() as u32, size, &extra)
    }

    fn enum32(&mut self, name: &str, size: u32, signed: bool, vals: &[(&str, u32)]) -> u32 {
        let mut extra = Vec::new();
        for &(n, v) in vals {
            extra.extend([self.s(n), v]);
        }
        self.raw(name, 6, signed, vals.len() as u32, size, &extra)
    }

    fn enum64(&mut self, name: &str, size: u32, signed: bool, vals: &[(&str, u64)]) -> u32 {
        let mut extra = Vec::new();
        for &(n, v) in vals {
            extra.extend([self.s(n), v as u32, (v >> 32) as u32]);
        }
        self.raw(name, 19, signed, vals.len() as u32, size, &extra)
    }

    fn build(&self) -> Vec<u8> {
        let tl = self.types.len() as u32;
        let mut b = vec![0x9f, 0xeb, 1, 0];
        for w in [24, 0, tl, tl, self.strs.len() as u32] {
            b.extend(u32::to_le_bytes(w));
        }
        b.extend(&self.types);
        b.extend(&self.strs);
        b
    }
}

const SIGNED: u32 = 1;
const CHAR: u32 = 2;
const BOOL: u32 = 4;

#[test]
fn enum64_and_signed_enums() {
    let mut b = Builder::new();
    let e64 = b.enum64(
        "big",
        8,
        false,
        &[("BIG_A", 1 << 40), ("BIG_MAX", u64::MAX)],
    );
    let s64 = b.enum64("sbig", 8, true, &[("S_A", 1)]);
    let s32 = b.enum32("small", 4, true, &[("MINUS_TWO", -2i32 as u32)]);
    let tb = TypedBtf::parse(&b.build()).unwrap();
    assert_eq!(tb.type_name(e64).unwrap(), "enum big");
    assert_eq!(
        tb.render(e64, &(1u64 << 40).to_le_bytes()).unwrap(),
        json!("BIG_A")
    );
    assert_eq!(
        tb.render(e64, &u64::MAX.to_le_bytes()).unwrap(),
        json!("BIG_MAX")
    );
    assert_eq!(tb.render(e64, &5u64.to_le_bytes()).unwrap(), json!(5));
    assert_eq!(tb.render(s64, &(-7i64).to_le_bytes()).unwrap(), json!(-7));
    assert_eq!(
        tb.render(s32, &(-2i32).to_le_bytes()).unwrap(),
        json!("MINUS_TWO")
    );
    assert_eq!(tb.render(s32, &(-3i32).to_le_bytes()).unwrap(), json!(-3));
}

#[test]
fn ints_of_every_encoding_and_width() {
    let mut b = Builder::new();
    let ch = b.int("char", 1, CHAR);
    let boolean = b.int("bool32", 4, BOOL);
    let odd = b.int("u24", 3, 0);
    let s128 = b.int("__int128", 16, SIGNED);
    let idx = b.int("__ARRAY_SIZE_TYPE__", 4, 0);
    let chars = b.array(ch, idx, 4);
    let half = b.raw("_Float16", 16, false, 0, 2, &[]);
    let f32t = b.raw("float", 16, false, 0, 4, &[]);
    let f64t = b.raw("double", 16, false, 0, 8, &[]);
    let ldbl = b.raw("long double", 16, false, 0, 16, &[]);
    let tb = TypedBtf::parse(&b.build()).unwrap();

    assert_eq!(tb.render(ch, b"A").unwrap(), json!("A"));
    // bpftool writes "\u0007": the same JSON string.
    assert_eq!(text(&tb.render(ch, &[7]).unwrap()), r#""\u0007""#);
    assert_eq!(tb.render(ch, &[0xe9]).unwrap(), json!("\u{e9}"));
    assert_eq!(tb.render(chars, b"hi\0\xff").unwrap(), json!("hi"));
    assert_eq!(
        tb.render(chars, b"hi\x01\0").unwrap(),
        json!(["h", "i", "\u{1}", "\u{0}"])
    );
    assert_eq!(tb.render(boolean, &[0, 0, 1, 0]).unwrap(), json!(true));
    assert_eq!(tb.render(boolean, &[0; 4]).unwrap(), json!(false));
    assert_eq!(
        tb.render(odd, &[0x01, 0x02, 0x03]).unwrap(),
        json!("0x30201")
    );
    assert_eq!(tb.render(s128, &[0; 16]).unwrap(), json!("0x0"));
    assert_eq!(
        tb.render(s128, &[0xff; 16]).unwrap(),
        json!("0xffffffffffffffffffffffffffffffff")
    );
    assert_eq!(
        tb.render(half, &0x3e00u16.to_le_bytes()).unwrap(),
        json!(1.5)
    );
    assert_eq!(
        tb.render(half, &0x0001u16.to_le_bytes()).unwrap(),
        json!(2f64.powi(-24))
    );
    assert_eq!(
        tb.render(half, &0xfc00u16.to_le_bytes()).unwrap(),
        json!("-inf")
    );
    assert_eq!(
        text(&tb.render(f32t, &0.1f32.to_le_bytes()).unwrap()),
        "0.1"
    );
    assert_eq!(
        tb.render(f32t, &f32::NAN.to_le_bytes()).unwrap(),
        json!("nan")
    );
    assert_eq!(
        tb.render(f64t, &f64::INFINITY.to_le_bytes()).unwrap(),
        json!("inf")
    );
    assert_eq!(
        tb.render(f64t, &1e300f64.to_le_bytes()).unwrap(),
        json!(1e300)
    );
    let mut ld = [0u8; 16];
    ld[15] = 0x40;
    assert_eq!(
        tb.render(ldbl, &ld).unwrap(),
        json!("0x40000000000000000000000000000000")
    );
}

#[test]
fn bitfields_anonymous_members_and_datasec() {
    let mut b = Builder::new();
    let u32t = b.int("unsigned int", 4, 0);
    let s32t = b.int("int", 4, SIGNED);
    let u64t = b.int("unsigned long", 8, 0);
    let boolt = b.int("_Bool", 1, BOOL);
    let e = b.enum32("e", 4, false, &[("E_ZERO", 0), ("E_SEVEN", 7)]);
    let inner = b.record(false, "", 4, &[("a", u32t, 0, 0)]);
    let clash = b.record(false, "", 4, &[("x", u32t, 0, 0)]);
    let outer = b.record(
        false,
        "outer",
        24,
        &[
            ("x", u32t, 0, 0),
            ("", inner, 32, 0),    // flattened: a
            ("", clash, 64, 0),    // would clash with x: kept as (anon#2)
            ("", s32t, 96, 0),     // anonymous scalar: (anon#3)
            ("neg", s32t, 128, 3), // 3 bits
            ("big", u64t, 131, 40),
            ("flag", boolt, 171, 1),
            ("ev", e, 172, 3),
        ],
    );
    let var_x = b.raw("gx", 14, false, 0, u32t, &[1]);
    let var_o = b.raw("go", 14, false, 0, outer, &[1]);
    let sec = b.raw(".data", 15, false, 2, 32, &[var_x, 0, 4, var_o, 8, 24]);
    let tb = TypedBtf::parse(&b.build()).unwrap();

    let mut bytes = [0u8; 24];
    bytes[0..4].copy_from_slice(&1u32.to_le_bytes());
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
    bytes[12..16].copy_from_slice(&(-4i32).to_le_bytes());
    // Bits from 128: neg=0b110 (-2), big=(1<<39)|5, flag=1, ev=7.
    let bits: u128 = 0b110 | (((1u128 << 39) | 5) << 3) | (1 << 43) | (7 << 44);
    bytes[16..24].copy_from_slice(&(bits as u64).to_le_bytes());
    let v = tb.render(outer, &bytes).unwrap();
    assert_eq!(
        text(&v),
        text(&json!({
            "x": 1, "a": 2, "(anon#2)": {"x": 3}, "(anon#3)": -4,
            "neg": -2, "big": (1u64 << 39) | 5, "flag": true, "ev": "E_SEVEN"
        }))
    );

    let mut data = vec![0u8; 32];
    data[0..4].copy_from_slice(&9u32.to_le_bytes());
    data[8..32].copy_from_slice(&bytes);
    let v = tb.render(sec, &data).unwrap();
    assert_eq!(v[".data"][0], json!({"gx": 9}));
    assert_eq!(v[".data"][1]["go"]["ev"], json!("E_SEVEN"));
    assert_eq!(tb.type_size(sec).unwrap(), 32);
    // A variable placed past the end of the bytes.
    assert!(matches!(
        tb.render(sec, &data[..16]),
        Err(BtfFmtError::ShortValue { .. })
    ));
}

#[test]
fn legacy_unaligned_member_and_out_of_bounds_member() {
    let mut b = Builder::new();
    let u8t = b.int("unsigned char", 1, 0);
    let u16t = b.int("unsigned short", 2, 0);
    // kind_flag 0, u8 member at bit 4: read 8 bits from there, as bpftool does.
    let legacy = b.record(false, "legacy", 2, &[("lo", u8t, 0, 0), ("mid", u8t, 4, 0)]);
    // Member claims to sit at byte 8 of a 2-byte struct.
    let bad = b.record(false, "bad", 2, &[("far", u16t, 64, 0)]);
    let tb = TypedBtf::parse(&b.build()).unwrap();
    assert_eq!(
        tb.render(legacy, &[0x21, 0x43]).unwrap(),
        json!({"lo": 0x21, "mid": 0x32})
    );
    let err = tb.render(bad, &[0, 0]).unwrap_err();
    assert!(matches!(err, BtfFmtError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("struct bad"), "{err}");
}

#[test]
fn hostile_btf_is_an_error_not_a_hang() {
    let mut b = Builder::new();
    // typedef loop: id 1 -> 2 -> 1
    let t1 = b.raw("loop_a", 8, false, 0, 2, &[]);
    let t2 = b.raw("loop_b", 8, false, 0, 1, &[]);
    let idx = b.int("__ARRAY_SIZE_TYPE__", 4, 0);
    let empty = b.record(false, "empty", 0, &[]);
    let huge = b.array(empty, idx, u32::MAX);
    let elem = b.int("unsigned int", 4, 0);
    let overflow = b.array(elem, idx, u32::MAX);
    let over2 = b.array(overflow, idx, u32::MAX);
    let over3 = b.array(over2, idx, u32::MAX);
    let fwd = b.raw("later", 7, false, 0, 0, &[]);
    let wide = b.record(false, "wide", 32, &[("w", elem, 0, 200)]);
    let tb = TypedBtf::parse(&b.build()).unwrap();

    for id in [t1, t2] {
        assert!(matches!(
            tb.render(id, &[0; 8]),
            Err(BtfFmtError::Malformed { .. })
        ));
        assert!(tb.type_size(id).is_err());
    }
    assert_eq!(tb.type_name(t1).unwrap(), "loop_a"); // typedef names don't recurse
    assert_eq!(tb.type_size(huge).unwrap(), 0);
    let err = tb.render(huge, &[]).unwrap_err();
    assert!(err.to_string().contains("too many JSON nodes"), "{err}");
    assert_eq!(
        tb.type_name(over3).unwrap(),
        "unsigned int[4294967295][4294967295][4294967295]"
    );
    assert!(matches!(
        tb.type_size(over3),
        Err(BtfFmtError::Malformed { .. })
    ));
    assert!(matches!(
        tb.render(fwd, &[0; 8]),
        Err(BtfFmtError::Unsupported { kind: "fwd", .. })
    ));
    assert_eq!(tb.type_name(fwd).unwrap(), "struct later");
    assert!(tb.render(wide, &[0; 32]).is_err());
}

/// Every type id of a parsed blob, plus a few past the end.
fn all_ids(tb: &TypedBtf) -> std::ops::RangeInclusive<u32> {
    0..=tb.max_id + 2
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        for tb in [le(), be()] {
            for id in all_ids(&tb) {
                let out = tb.render(id, &bytes);
                // Sized value types always render once there are enough bytes.
                if let (Ok(size), Ok(Type::Struct(_) | Type::Int(_) | Type::Array(_))) =
                    (tb.type_size(id), tb.ty(id))
                    && size <= bytes.len()
                {
                    prop_assert!(out.is_ok(), "id {id}: {out:?}");
                }
                let _ = tb.type_name(id);
            }
        }
    }

    #[test]
    fn corrupted_btf_never_panics(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut blob = BTF_LE.to_vec();
        // Leave the header alone half the time so that parsing usually succeeds.
        for (i, (at, byte)) in edits.iter().enumerate() {
            let lo = if i % 2 == 0 { 24 } else { 0 };
            let pos = lo + at.index(blob.len() - lo);
            blob[pos] = *byte;
        }
        if let Ok(tb) = TypedBtf::parse(&blob) {
            for id in all_ids(&tb) {
                let _ = tb.render(id, &bytes);
                let _ = tb.type_name(id);
                let _ = tb.type_size(id);
            }
        }
    }

    #[test]
    fn random_blobs_never_panic(blob in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = TypedBtf::parse(&blob);
    }
}
