//! Kernel test of the test fixture itself: the clang-compiled object in tests/bpf loads
//! with aya, every map gets the expected kernel type, is pinned by name and carries BTF
//! where the kernel allows it, and the map-in-maps accept and return inner maps.
//!
//! Needs root and bpffs (`make deps`).

mod common;

use std::path::Path;

use aya::{
    maps::{Array, ArrayOfMaps, HashOfMaps, Map, MapData, MapInfo, MapType},
    programs::Xdp,
};
use common::{TEST_MAPS, bpftool_map_show, fresh_pin_dir, load_test_object};

/// bpftool's name for a map type (`"type"` in `bpftool -j map show`).
fn bpftool_type_name(t: MapType) -> &'static str {
    match t {
        MapType::Hash => "hash",
        MapType::LruHash => "lru_hash",
        MapType::PerCpuHash => "percpu_hash",
        MapType::Array => "array",
        MapType::PerCpuArray => "percpu_array",
        MapType::LpmTrie => "lpm_trie",
        MapType::HashOfMaps => "hash_of_maps",
        MapType::ArrayOfMaps => "array_of_maps",
        MapType::Queue => "queue",
        MapType::Stack => "stack",
        other => panic!("no bpftool name listed for {other:?}"),
    }
}

fn check_map(pin_dir: &Path, name: &str, expected: MapType, has_btf: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let path = pin_dir.join(name);
    if !path.exists() {
        return vec![format!("{name}: not pinned at {}", path.display())];
    }

    match MapInfo::from_pin(&path) {
        Ok(info) => match info.map_type() {
            Ok(t) if t == expected => {}
            Ok(t) => problems.push(format!(
                "{name}: aya says type {t:?}, expected {expected:?}"
            )),
            Err(e) => problems.push(format!("{name}: aya cannot read the type: {e}")),
        },
        Err(e) => problems.push(format!("{name}: MapInfo::from_pin failed: {e}")),
    }

    let shown = bpftool_map_show(&path);
    let want_type = bpftool_type_name(expected);
    if shown["type"] != want_type {
        problems.push(format!(
            "{name}: bpftool type {}, expected {want_type}",
            shown["type"]
        ));
    }
    if shown["name"] != name {
        problems.push(format!("{name}: kernel name is {}", shown["name"]));
    }
    // bpftool omits btf_id when the map has none.
    let btf_id = shown["btf_id"].as_u64().unwrap_or(0);
    if has_btf && btf_id == 0 {
        problems.push(format!(
            "{name}: expected key/value BTF, btf_id is 0: {shown}"
        ));
    }
    if !has_btf && btf_id != 0 {
        problems.push(format!(
            "{name}: expected no BTF (aya and libbpf create this type without it), got btf_id {btf_id}"
        ));
    }
    problems
}

#[test]
fn every_map_is_pinned_with_its_type_and_btf() {
    let dir = fresh_pin_dir("bpf-object-types");
    let ebpf = load_test_object(&dir);

    let mut problems = Vec::new();
    for &(name, expected, has_btf) in TEST_MAPS {
        if ebpf.map(name).is_none() {
            problems.push(format!("{name}: aya did not create it"));
        }
        problems.extend(check_map(&dir, name, expected, has_btf));
    }
    assert!(
        problems.is_empty(),
        "test object maps are not as expected:\n  {}",
        problems.join("\n  ")
    );

    let loaded: Vec<_> = ebpf.maps().map(|(name, _)| name.to_owned()).collect();
    assert_eq!(
        loaded.len(),
        TEST_MAPS.len(),
        "aya created maps {loaded:?}, expected exactly those in TEST_MAPS"
    );

    // Spot-check the definitions came through: sizes, max_entries, flags.
    let trie = bpftool_map_show(&dir.join("trie"));
    assert_eq!(trie["flags"], 1, "trie must have BPF_F_NO_PREALLOC: {trie}");
    assert_eq!(
        trie["bytes_key"], 8,
        "trie key is {{ u32 prefixlen; u8 addr[4]; }}: {trie}"
    );
    let flows = bpftool_map_show(&dir.join("flows"));
    assert_eq!(flows["bytes_key"], 16, "{flows}");
    assert_eq!(flows["bytes_value"], 40, "{flows}");
    assert_eq!(flows["max_entries"], 1024, "{flows}");
    let locked = bpftool_map_show(&dir.join("locked"));
    assert_eq!(locked["bytes_value"], 24, "{locked}");
    let fifo = bpftool_map_show(&dir.join("fifo"));
    assert_eq!(fifo["bytes_key"], 0, "{fifo}");
    assert_eq!(fifo["bytes_value"], 16, "{fifo}");
}

#[test]
fn xdp_program_using_the_spin_lock_map_loads() {
    let dir = fresh_pin_dir("bpf-object-prog");
    let mut ebpf = load_test_object(&dir);
    let prog: &mut Xdp = ebpf
        .program_mut("pass")
        .expect("program `pass` in the object")
        .try_into()
        .expect("`pass` is an XDP program");
    // The verifier accepts bpf_spin_lock only on a map whose value BTF has the lock.
    prog.load()
        .unwrap_or_else(|e| panic!("loading XDP program `pass` failed: {e} ({e:?})"));
}

#[test]
fn reloading_reuses_the_pinned_maps() {
    let dir = fresh_pin_dir("bpf-object-reload");
    let first = load_test_object(&dir);
    let ids = |dir: &Path| -> Vec<u32> {
        TEST_MAPS
            .iter()
            .map(|(name, _, _)| {
                MapInfo::from_pin(dir.join(name))
                    .unwrap_or_else(|e| panic!("{name}: {e}"))
                    .id()
            })
            .collect()
    };
    let before = ids(&dir);
    let second = load_test_object(&dir);
    assert_eq!(
        before,
        ids(&dir),
        "a second load must reuse the pinned maps"
    );
    drop((first, second));
}

type Inner = Array<MapData, u64>;

/// An inner map matching `struct inner_map` (ARRAY, u32 -> u64, 4 entries).
fn inner_with(values: [u64; 4]) -> Inner {
    let mut inner = Inner::create(4, 0).expect("create an inner ARRAY map");
    for (i, v) in values.into_iter().enumerate() {
        let i = u32::try_from(i).expect("index fits u32");
        inner.set(i, v, 0).expect("set inner value");
    }
    inner
}

fn inner_values(inner: &Inner) -> Vec<u64> {
    (0..4)
        .map(|i| inner.get(&i, 0).expect("read inner value"))
        .collect()
}

#[test]
fn map_in_maps_hold_inner_maps() {
    let dir = fresh_pin_dir("bpf-object-mim");
    let mut ebpf = load_test_object(&dir);

    // HASH_OF_MAPS through the loader's handle.
    let mut outer_hash: HashOfMaps<MapData, u32, Inner> = ebpf
        .take_map("outer_hash")
        .expect("outer_hash in the object")
        .try_into()
        .expect("outer_hash is a HASH_OF_MAPS of u32 keys");
    let a = inner_with([1, 2, 3, 4]);
    let b = inner_with([10, 20, 30, 40]);
    outer_hash
        .insert(7, &a, 0)
        .expect("insert inner map at key 7");
    outer_hash
        .insert(9, &b, 0)
        .expect("insert inner map at key 9");
    let got = outer_hash.get(&7, 0).expect("lookup key 7");
    assert_eq!(inner_values(&got), [1, 2, 3, 4]);
    let mut keys: Vec<u32> = outer_hash
        .keys()
        .collect::<Result<_, _>>()
        .expect("iterate outer_hash keys");
    keys.sort_unstable();
    assert_eq!(keys, [7, 9]);

    // An inner map of another shape is refused by the kernel (template check).
    let wrong = Inner::create(8, 0).expect("create an 8-entry ARRAY");
    assert!(
        outer_hash.insert(1, &wrong, 0).is_err(),
        "the kernel must refuse an inner map whose max_entries differs from the template"
    );

    // ARRAY_OF_MAPS reopened from its pin, as mapsnap will see it.
    let pinned = MapData::from_pin(dir.join("outer_arr")).expect("open pinned outer_arr");
    let mut outer_arr: ArrayOfMaps<MapData, Inner> = Map::from_map_data(pinned)
        .expect("classify outer_arr")
        .try_into()
        .expect("outer_arr is an ARRAY_OF_MAPS");
    assert_eq!(outer_arr.len(), 4);
    outer_arr.set(2, &b, 0).expect("set inner map at index 2");
    let got = outer_arr.get(&2, 0).expect("lookup index 2");
    assert_eq!(inner_values(&got), [10, 20, 30, 40]);
    assert!(outer_arr.get(&0, 0).is_err(), "index 0 holds no map");

    // The pinned outer_hash (reopened) sees the same inner maps: lookups return ids.
    let reopened = MapData::from_pin(dir.join("outer_hash")).expect("open pinned outer_hash");
    let reopened: HashOfMaps<MapData, u32, Inner> = Map::from_map_data(reopened)
        .expect("classify outer_hash")
        .try_into()
        .expect("outer_hash is a HASH_OF_MAPS");
    let got = reopened.get(&9, 0).expect("lookup key 9 via the pin");
    assert_eq!(inner_values(&got), [10, 20, 30, 40]);
}
