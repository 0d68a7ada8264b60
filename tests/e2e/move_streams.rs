//! What a move stream may reach on the target (docs/security.md §16, "clone sources"), tried as
//! a compromised source would: this machine is the target and the test plays the source,
//! crafting real `btrfs send` streams here and posting them to the receive route with master
//! tokens. One machine is enough (no network between hosts is involved).
use base64::Engine as _;
use serde_json::{Value, json};

use crate::tb::{self, DropIn, new_id, ok, sh};

const MASTER_DROP_IN: &str = "/etc/cocalc-project-host/config.d/90-e2e-move-streams.toml";
/// Where the test makes its subvolumes: on the projects' filesystem (so clone sources and
/// parents resolve as they would for a real move), outside every project.
const WORK: &str = "/var/lib/cocalc-project-host/projects/.e2e-move-streams";

/// Deletes the test's subvolumes and projects, also when the test fails.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for id in &self.0 {
            sh(&format!(
                "curl -s -X DELETE {} '{}/projects/{id}' >/dev/null",
                tb::AUTH,
                tb::API
            ));
        }
        sh(&format!(
            "for s in {WORK}/r/* {WORK}/* {WORK}/.move-*; do btrfs -q subvolume delete \"$s\" 2>/dev/null; done; rm -rf {WORK}"
        ));
    }
}

/// The subvolume UUID `btrfs subvolume show` prints for `path`.
fn uuid_of(path: &str) -> String {
    ok(&format!(
        "btrfs subvolume show {path} | awk '$1 == \"UUID:\" {{print $2; exit}}'"
    ))
}

/// Writes `/tmp/body-<mv>`: the manifest line, the stream in `/tmp/stream-<mv>`, the HMAC
/// trailer keyed with `token` (as a source does, docs/moves.md), then POSTs it.
fn post(token: &str, id: &str, mv: &str, manifest: Value) -> (u16, Value) {
    let manifest = manifest.to_string();
    let py = format!(
        "import hmac,hashlib,sys\nd=b'{manifest}\\n'+open('/tmp/stream-{mv}','rb').read()\nm=hmac.new(sys.argv[1].encode(),d,hashlib.sha256).digest()\nopen('/tmp/body-{mv}','wb').write(d+m)\n"
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(py);
    ok(&format!(
        "echo {b64} | base64 -d > /tmp/mk-{mv}.py && python3 /tmp/mk-{mv}.py '{token}'"
    ));
    let out = ok(&format!(
        "curl -sS -m 60 -H 'Authorization: Bearer {token}' --data-binary @/tmp/body-{mv} -o /tmp/b-{mv} -w '%{{http_code}}' -X POST '{}/projects/{id}/receive/{mv}'; echo; cat /tmp/b-{mv}; rm -f /tmp/b-{mv} /tmp/body-{mv} /tmp/mk-{mv}.py",
        tb::API
    ));
    let (s, rest) = out.split_once('\n').unwrap();
    (
        s.parse().unwrap(),
        serde_json::from_str(rest).unwrap_or(Value::Null),
    )
}

fn manifest(mv: &str, id: &str, seq: u64, name: &str, uuid: &str) -> Value {
    json!({"move_id": mv, "project_id": id, "seq": seq, "name": name, "uuid": uuid, "config": {}})
}

#[test]
fn a_stream_may_not_clone_another_projects_data_nor_take_its_uuid() {
    let (seed, b64) = tb::master_key();
    let _master = DropIn::install(
        MASTER_DROP_IN,
        &format!("[auth]\nmaster_public_keys = [\"{b64}\"]\nmax_token_lifetime = 3600\n"),
    );
    let host = tb::host_id();
    let token = |id: &str| {
        let now = cocalc_project_host::auth::now_secs();
        cocalc_project_host::auth::sign(
            &seed,
            &json!({"aud": host, "sub": "e2e-master", "iat": now, "exp": now + 600,
                    "scope": {"projects": [id], "actions": ["move"]}}),
        )
        .unwrap()
    };
    let (victim, attacker) = (new_id(), new_id());
    let _cleanup = Cleanup(vec![victim.clone(), attacker.clone()]);
    sh(&format!("rm -rf {WORK}"));
    ok(&format!("mkdir -p {WORK}/r"));

    // The victim arrives by a legitimate move (its source made these streams): a snapshot
    // `snap1` holding a secret, then its live state. On this host `snap1` then carries the
    // received UUID `u`, which that source knows.
    let secret = new_id();
    ok(&format!(
        "btrfs -q subvolume create {WORK}/vsrc && for i in $(seq 4096); do echo {secret}; done > {WORK}/vsrc/secret \
         && btrfs -q subvolume snapshot -r {WORK}/vsrc {WORK}/snap1"
    ));
    let u = uuid_of(&format!("{WORK}/snap1"));
    let (tv, m1) = (token(&victim), uuid::Uuid::new_v4().to_string());
    ok(&format!("btrfs send -q {WORK}/snap1 > /tmp/stream-{m1}"));
    let (s, v) = post(&tv, &victim, &m1, manifest(&m1, &victim, 1, "snap1", &u));
    assert_eq!((s, v["placed"].as_bool()), (200, Some(false)), "{v}");
    let live = format!(".move-{m1}-2");
    ok(&format!(
        "btrfs -q subvolume snapshot -r {WORK}/vsrc {WORK}/{live} && btrfs send -q {WORK}/{live} > /tmp/stream-{m1}"
    ));
    let mut last = manifest(&m1, &victim, 2, &live, &uuid_of(&format!("{WORK}/{live}")));
    last["last"] = json!(["snap1"]);
    let (s, v) = post(&tv, &victim, &m1, last);
    assert_eq!((s, v["placed"].as_bool()), (200, Some(true)), "{v}");
    let holders = ok(&format!(
        "btrfs subvolume list -R {} | grep -c 'received_uuid {u} ' || true",
        tb::STORAGE
    ));
    assert_eq!(
        holders, "1",
        "the victim's snapshot holds the received UUID {u}"
    );

    // The same source, compromised, now moves its own project: a base snapshot, then a final
    // stream incremental to it whose file is a reflink of the victim's secret, sent with the
    // victim's snapshot as a clone source: the stream says "clone from {u}".
    let (ta, m2) = (token(&attacker), uuid::Uuid::new_v4().to_string());
    ok(&format!(
        "btrfs -q subvolume create {WORK}/asrc && btrfs -q subvolume snapshot -r {WORK}/asrc {WORK}/base \
         && btrfs send -q {WORK}/base > /tmp/stream-{m2}"
    ));
    let base = uuid_of(&format!("{WORK}/base"));
    let (s, v) = post(
        &ta,
        &attacker,
        &m2,
        manifest(&m2, &attacker, 1, "base", &base),
    );
    assert_eq!((s, v["placed"].as_bool()), (200, Some(false)), "{v}");
    let live = format!(".move-{m2}-2");
    ok(&format!(
        "cp --reflink=always {WORK}/snap1/secret {WORK}/asrc/stolen && btrfs -q subvolume snapshot -r {WORK}/asrc {WORK}/{live} \
         && btrfs filesystem sync {WORK} && btrfs send -q -p {WORK}/base -c {WORK}/snap1 {WORK}/{live} > /tmp/stream-{m2}"
    ));
    // the attack is real: the stream clones the secret's extents from the victim's UUID
    let dump = ok(&format!(
        "btrfs receive --dump -f /tmp/stream-{m2} | awk '$1 == \"clone\"' | head -3"
    ));
    assert!(
        dump.contains("stolen"),
        "no clone command in the crafted stream: {dump}"
    );
    let mut m = manifest(
        &m2,
        &attacker,
        2,
        &live,
        &uuid_of(&format!("{WORK}/{live}")),
    );
    m["parent"] = json!("base");
    m["parent_uuid"] = json!(base);
    m["last"] = json!(["base"]);
    let (s, v) = post(&ta, &attacker, &m2, m);
    assert_eq!((s, v["code"].as_str()), (409, Some("move_rejected")), "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("clones data from"),
        "{v}"
    );
    // nothing placed, nothing of the secret anywhere under the attacker's move or project
    assert_eq!(
        ok(&format!(
            "test -e {}/project-{attacker} && echo yes || echo no",
            tb::STORAGE
        )),
        "no"
    );
    assert_eq!(
        ok(&format!("ls -A {}/.moves/{m2}", tb::STORAGE)),
        "base",
        "what the refused stream would have made is not staged"
    );
    assert_eq!(
        ok(&format!(
            "grep -rl {secret} {}/.moves/{m2} 2>/dev/null | wc -l",
            tb::STORAGE
        )),
        "0"
    );
    // the victim is whole
    assert_eq!(
        ok(&format!(
            "find {}/project-{victim} -name secret -exec grep -c {secret} {{}} \\; | head -1",
            tb::STORAGE
        )),
        "4096"
    );

    // Nor may a stream take the victim's UUID for its own subvolume (a later incremental
    // stream naming it as parent could then be resolved to the victim's subvolume): a stream
    // whose subvolume has the received UUID `u` (made by receiving the victim's snapshot
    // here and sending that copy) is refused before receive.
    let m3 = uuid::Uuid::new_v4().to_string();
    ok(&format!(
        "btrfs send -q {WORK}/snap1 | btrfs receive -q {WORK}/r/ && btrfs send -q {WORK}/r/snap1 > /tmp/stream-{m3}"
    ));
    let (s, v) = post(
        &ta,
        &attacker,
        &m3,
        manifest(&m3, &attacker, 1, "snap1", &u),
    );
    assert_eq!((s, v["code"].as_str()), (409, Some("move_rejected")), "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("already the received UUID of another subvolume"),
        "{v}"
    );
    assert_eq!(ok(&format!("ls -A {}/.moves/{m3}", tb::STORAGE)), "");
    sh(&format!(
        "rm -f /tmp/stream-{m1} /tmp/stream-{m2} /tmp/stream-{m3}"
    ));
}
