//! Property tests (proptest) for the parsers that take outside input: project ids, request
//! routes and bodies, bearer tokens and their claims, public keys, token files, config sizes and
//! fragments. Whatever the input: no panic, and what is accepted is exactly what should be.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use std::path::Path;

use cocalc_project_host::adapters::http::{Route, route};
use cocalc_project_host::auth::{self, Auth, Principal};
use cocalc_project_host::config;
use cocalc_project_host::domain::project::{ProjectId, RunConfig};
use hyper::Method;
use proptest::prelude::*;
use serde_json::json;

const HOST: &str = "0b7e5b8e-1111-4222-8333-444455556666";
const SEED: [u8; 32] = [3; 32];

fn auth() -> Auth {
    use base64::Engine as _;
    let pk = ed25519_dalek::SigningKey::from_bytes(&SEED)
        .verifying_key()
        .to_bytes();
    let key =
        auth::parse_public_key(&base64::engine::general_purpose::STANDARD.encode(pk)).unwrap();
    Auth::new(
        &["admin-token-0123456789abcdef".into()],
        vec![key],
        HOST,
        3600,
    )
}

fn uuid_like() -> impl Strategy<Value = String> {
    "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::HEAD),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn ids_parse_iff_canonical(s in ".{0,48}") {
        if let Ok(id) = s.parse::<ProjectId>() {
            prop_assert_eq!(id.to_string(), s.clone());
            prop_assert_eq!(ProjectId::from_unit_name(&id.unit_name()), Some(id));
        }
    }

    #[test]
    fn canonical_ids_always_parse(s in uuid_like()) {
        let id: ProjectId = s.parse().unwrap();
        prop_assert_eq!(id.to_string(), s.clone());
        prop_assert!(s.to_uppercase().parse::<ProjectId>().is_err() || s.to_uppercase() == s);
    }

    #[test]
    fn routes_never_panic_and_ids_are_canonical(m in method(), p in "(/[a-z0-9%.-]{0,40}){0,4}/?") {
        match route(&m, &p) {
            Ok(Route::Status(id) | Route::Start(id) | Route::Stop(id)) => {
                prop_assert!(p.contains(&id.to_string()));
            }
            Ok(
                Route::Config(id)
                | Route::SetConfig(id)
                | Route::SetQuota(id)
                | Route::Snapshots(id)
                | Route::CreateSnapshot(id)
                | Route::DeleteSnapshot(id, _)
                | Route::RestoreSnapshot(id, _)
                | Route::AuthorizedKeys(id)
                | Route::SetAuthorizedKeys(id)
                | Route::Remove(id)
                | Route::Logs(id)
                | Route::Move(id)
                | Route::Receive(id, _)
                | Route::ReceiveState(id, _)
                | Route::ReceiveAbort(id, _),
            ) => {
                prop_assert!(p.contains(&id.to_string()));
            }
            Ok(Route::SweepSnapshots) => prop_assert_eq!(p.as_str(), "/snapshots/sweep"),
            Ok(Route::Revoke) => prop_assert_eq!(p.as_str(), "/auth/revoked"),
            Ok(Route::Health) => prop_assert_eq!(p.as_str(), "/healthz"),
            Ok(Route::List) => prop_assert_eq!(p.as_str(), "/projects"),
            Ok(Route::Host) => prop_assert_eq!(p.as_str(), "/host"),
            Ok(Route::Events) => prop_assert_eq!(p.as_str(), "/events"),
            Ok(Route::Metrics) => prop_assert_eq!(p.as_str(), "/metrics"),
            Ok(Route::Operation(op) | Route::CancelOperation(op)) => {
                prop_assert_eq!(p, format!("/operations/{op}"));
            }
            Err(e) => prop_assert!([400, 404, 405].contains(&e.status.as_u16()), "{:?}", e),
        }
    }

    #[test]
    fn route_of_any_id_path(id in uuid_like(), action in "status|start|stop") {
        let want = if action == "status" { Method::GET } else { Method::POST };
        let r = route(&want, &format!("/projects/{id}/{action}")).unwrap();
        let (a, project) = r.permission().unwrap();
        prop_assert_eq!(a.as_str(), action.as_str());
        prop_assert_eq!(project.unwrap().to_string(), id);
    }

    #[test]
    fn run_configs_from_any_json_never_panic(v in arb_json(3)) {
        if let Ok(c) = serde_json::from_value::<RunConfig>(v) {
            let _ = c.validate();
        }
    }

    #[test]
    fn random_tokens_are_never_accepted(t in "[ -~]{0,300}") {
        let a = auth();
        let r = a.authenticate(Some(format!("Bearer {t}").as_bytes()));
        prop_assert!(r.is_err() || t.trim() == "admin-token-0123456789abcdef", "{:?}", r);
        let _ = a.authenticate(Some(t.as_bytes()));
    }

    #[test]
    fn random_jwt_shaped_tokens_are_never_accepted(a in "[A-Za-z0-9_-]{0,80}", b in "[A-Za-z0-9_-]{0,200}", c in "[A-Za-z0-9_-]{0,100}") {
        let token = format!("{a}.{b}.{c}");
        prop_assert!(auth().verify(&token, auth::now_secs()).is_err());
    }

    #[test]
    fn any_signed_claims_either_verify_with_a_scope_or_are_refused(claims in arb_json(3), scope in arb_json(2)) {
        // correctly signed tokens with arbitrary claims: no panic; an accepted one is a master
        // whose scope came from a well-formed claim set
        let mut c = claims;
        if let Some(o) = c.as_object_mut() {
            o.insert("scope".into(), scope);
        }
        let token = auth::sign(&SEED, &c).unwrap();
        if let Ok(p) = auth().verify(&token, auth::now_secs()) {
            let is_master = matches!(p, Principal::Master { .. });
            prop_assert!(is_master);
            prop_assert!(aud_names_host(&c["aud"]), "accepted with aud {}", c["aud"]);
        }
    }

    #[test]
    fn an_aud_list_is_accepted_iff_it_holds_the_host(others in proptest::collection::vec(prop_oneof![uuid_like(), "[ -~]{0,12}"], 0..4), with_host in any::<bool>(), at in 0usize..4) {
        // the rule (RFC 7519 4.1.3): aud is this host's id, or a list holding it
        let now = auth::now_secs();
        let mut aud = others;
        if with_host {
            aud.insert(at.min(aud.len()), HOST.to_string());
        }
        let c = json!({"aud": aud, "sub": "s", "exp": now + 60, "scope": {"projects": "*", "actions": ["status"]}});
        let r = auth().verify(&auth::sign(&SEED, &c).unwrap(), now);
        prop_assert_eq!(r.is_ok(), aud_names_host(&c["aud"]), "aud {}: {:?}", c["aud"], r);
        if let Err(e) = r {
            prop_assert!(e.to_string().contains("audience"), "{}", e);
        }
    }

    #[test]
    fn well_formed_scoped_tokens_verify(ids in proptest::collection::vec(uuid_like(), 0..5), acts in proptest::collection::vec("list|status|start|stop|snapshot", 0..5), ttl in 1u64..3600) {
        let now = auth::now_secs();
        let c = json!({"aud": HOST, "sub": "s", "exp": now + ttl, "scope": {"projects": ids, "actions": acts}});
        let p = auth().verify(&auth::sign(&SEED, &c).unwrap(), now).unwrap();
        for id in &ids {
            let id: ProjectId = id.parse().unwrap();
            prop_assert!(p.sees(&id));
            for a in auth::Action::ALL {
                prop_assert_eq!(p.allows(a, Some(&id)), acts.iter().any(|x| x == a.as_str()));
            }
        }
    }

    #[test]
    fn public_keys_and_token_files_never_panic(s in "[ -~\n]{0,200}") {
        let _ = auth::parse_public_key(&s);
        if let Ok(tokens) = auth::parse_tokens(&s) {
            for t in tokens {
                prop_assert!(t.len() >= auth::MIN_ADMIN_TOKEN_LEN && !t.contains(char::is_whitespace));
            }
        }
    }

    #[test]
    fn sizes_parse_or_refuse(s in "[0-9 ]{0,22}[KMGTkmgtQx]?") {
        if let Ok(n) = config::parse_size(&s) {
            let digits: String = s.chars().filter(char::is_ascii_digit).collect();
            prop_assert!(n >= digits.parse::<u64>().unwrap_or(0) || digits.is_empty());
        }
    }

    #[test]
    fn config_fragments_never_panic(text in "(\\[(auth|storage|projects)\\]\n)?([a-z_]{1,20} = (\"[ -~]{0,20}\"|[0-9]{1,12}|\\[\\])\n){0,4}") {
        let _ = config::merge([(Path::new("/etc/x/config.toml"), text.as_str())]);
    }
}

/// Whether a token's `aud` claim names this host: its id, or a list holding it.
fn aud_names_host(aud: &serde_json::Value) -> bool {
    match aud {
        serde_json::Value::String(s) => s == HOST,
        serde_json::Value::Array(a) => a.iter().any(|v| v.as_str() == Some(HOST)),
        _ => false,
    }
}

fn arb_json(depth: u32) -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "[ -~]{0,12}".prop_map(serde_json::Value::from),
        Just(json!(HOST)),
        Just(json!("*")),
        Just(json!(auth::now_secs() + 60)),
    ];
    leaf.prop_recursive(depth, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("aud".to_string()),
                    Just("sub".to_string()),
                    Just("exp".to_string()),
                    Just("iat".to_string()),
                    Just("projects".to_string()),
                    Just("actions".to_string()),
                    Just("image".to_string()),
                    Just("env".to_string()),
                    Just("cpu".to_string()),
                    Just("memory".to_string()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}
