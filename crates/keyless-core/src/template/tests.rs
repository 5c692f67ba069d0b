use super::*;
use serde_json::json;

fn scope() -> Scope {
    Scope {
        level: Level::ResourceGroup,
        location: None,
        subscription_id: "00000000-0000-0000-0000-000000000001".into(),
        tenant_id: "10000000-0000-0000-0000-000000000000".into(),
        resource_group: "Rg1".into(),
        resource_group_location: "westus2".into(),
        deployment_name: "dep1".into(),
        environment: json!({"name": "Keyless", "suffixes": {"keyvaultDns": ".vault.localhost:8443"}}),
    }
}

const RG: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/Rg1";

fn tpl(resources: Value) -> Value {
    json!({
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "resources": resources,
    })
}

fn prep(t: &Value, p: Value) -> Result<Plan, TemplateError> {
    Plan::prepare_at(t, &p, &scope(), 1_709_211_909, 7)
}

fn err(t: &Value, p: Value) -> TemplateError {
    prep(t, p).expect_err("template should be refused")
}

/// Evaluate one expression in a resource body (no parameters).
fn eval1(expr: &str) -> Result<Value, TemplateError> {
    let t = tpl(json!([{
        "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
        "apiVersion": "2023-01-31",
        "name": "id1",
        "properties": {"v": expr},
    }]));
    let plan = prep(&t, json!({}))?;
    Ok(plan.body(0, &NoReferences)?["properties"]["v"].clone())
}

struct Store(HashMap<String, Value>);

impl References for Store {
    fn get(&self, id: &str) -> Option<Value> {
        self.0.get(&id.to_ascii_lowercase()).cloned()
    }
}

/// Seed 003's template, as written (indented with spaces here).
const SEED_003: &str = r#"{

    "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
    "contentVersion": "1.0.0.0",
    "variables": {},
    "parameters": {
        "location": {
            "type": "string",
            "defaultValue": "westcentralus",
            "metadata": {
                "description": "Location for identities resources. FIC should be enabled in this region."
            }
        },
        "userAssignedIdentityName": {
            "type": "string",
            "defaultValue": "FIC_UA",
            "metadata": {
                "description": "Name of the User Assigned identity (parent identity)"
            }
        },
        "federatedIdentityCredential": {
            "type": "string",
            "defaultValue": "testCredential",
            "metadata": {
                "description": "Name of the Federated Identity Credential"
            }
        },
        "federatedIdentityCredentialIssuer": {
            "type": "string",
            "defaultValue": "https://aks.azure.com/issuerGUID",
            "metadata": {
                "description": "Federated Identity Credential token issuer"
            }
        },
        "federatedIdentityCredentialSubject": {
            "type": "string",
            "defaultValue": "system:serviceaccount:ns:svcaccount",
            "metadata": {
                "description": "Federated Identity Credential token subject"
            }
        },
        "federatedIdentityCredentialAudience": {
            "type": "string",
            "defaultValue": " api://AzureADTokenExchange",
            "metadata": {
                "description": "Federated Identity Credential audience. Single value is only supported."
            }
        }
    },
    "resources": [
        {
            "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
            "apiVersion": "2018-11-30",
            "name": "[parameters('userAssignedIdentityName')]",
            "location": "[parameters('location')]",
            "tags": {
                "firstTag": "ficTest"
            },
            "resources": [
                {
                    "type": "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials",
                    "apiVersion": "2022-01-31-PREVIEW",
                    "name": "[concat(parameters('userAssignedIdentityName'), '/', parameters('federatedIdentityCredential'))]",
                    "dependsOn": [
                      "[resourceId('Microsoft.ManagedIdentity/userAssignedIdentities', parameters('userAssignedIdentityName'))]"
                    ],
                    "properties": {
                        "issuer": "[parameters('federatedIdentityCredentialIssuer')]",
                        "subject": "[parameters('federatedIdentityCredentialSubject')]",
                        "audiences": [
                            "[parameters('federatedIdentityCredentialAudience')]"
                        ]
                    }
                }
            ]
        }
    ]
}"#;

#[test]
fn seed_003_template_as_az_sends_it() {
    let t = parse_jsonc(SEED_003).unwrap();
    // az passes --parameters on the command line as {"name": {"value": …}}.
    let p = json!({
        "userAssignedIdentityName": {"value": "uai-cli01"},
        "federatedIdentityCredential": {"value": "fic-cli01"},
        "federatedIdentityCredentialIssuer": {"value": "https://issuer.example/abc"},
        "location": {"value": "westus2"},
    });
    let plan = prep(&t, p).unwrap();
    assert_eq!(plan.resources.len(), 2);
    let ua = &plan.resources[0];
    assert_eq!(
        ua.full_type,
        "Microsoft.ManagedIdentity/userAssignedIdentities"
    );
    assert_eq!(ua.name, "uai-cli01");
    assert_eq!(
        ua.id,
        format!("{RG}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/uai-cli01")
    );
    assert_eq!(ua.api_version, "2018-11-30");
    assert!(ua.depends_on.is_empty());
    let fic = &plan.resources[1];
    assert_eq!(
        fic.full_type,
        "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials"
    );
    assert_eq!(fic.name, "uai-cli01/fic-cli01");
    assert_eq!(
        fic.id,
        format!("{RG}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/uai-cli01/federatedIdentityCredentials/fic-cli01")
    );
    assert_eq!(fic.api_version, "2022-01-31-PREVIEW");
    assert_eq!(fic.depends_on, vec![0]);
    assert_eq!(fic.copy, None);

    assert_eq!(
        plan.body(0, &NoReferences).unwrap(),
        json!({"location": "westus2", "tags": {"firstTag": "ficTest"}})
    );
    assert_eq!(
        plan.body(1, &NoReferences).unwrap(),
        json!({"properties": {
            "issuer": "https://issuer.example/abc",
            "subject": "system:serviceaccount:ns:svcaccount",
            "audiences": [" api://AzureADTokenExchange"],
        }})
    );
    let echoed = plan.echoed_parameters();
    assert_eq!(
        echoed["location"],
        json!({"type": "String", "value": "westus2"})
    );
    assert_eq!(
        echoed["federatedIdentityCredentialSubject"],
        json!({"type": "String", "value": "system:serviceaccount:ns:svcaccount"})
    );
    assert_eq!(echoed.as_object().unwrap().len(), 6);
    assert_eq!(plan.outputs(&NoReferences).unwrap(), json!({}));
}

#[test]
fn seed_003_with_its_odd_whitespace_and_comments() {
    let odd = SEED_003
        .replace("    ", "\u{202f}\u{202f}\u{202f}\u{202f}")
        .replacen(
            "\"variables\": {},",
            "\"variables\": {}, // none\n /* block */",
            1,
        );
    let t = parse_jsonc(&odd).unwrap();
    assert_eq!(t, parse_jsonc(SEED_003).unwrap());
}

#[test]
fn two_fics_without_depends_on_depend_only_on_the_identity() {
    let t = tpl(json!([
        {
            "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
            "apiVersion": "2023-01-31",
            "name": "ua",
            "location": "[resourceGroup().location]",
        },
        {
            "type": "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials",
            "apiVersion": "2023-01-31",
            "name": "ua/fic1",
            "dependsOn": ["ua"],
            "properties": {"issuer": "https://i", "subject": "s1", "audiences": ["api://AzureADTokenExchange"]},
        },
        {
            "type": "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials",
            "apiVersion": "2023-01-31",
            "name": "ua/fic2",
            "dependsOn": ["[resourceId('Microsoft.ManagedIdentity/userAssignedIdentities', 'ua')]"],
            "properties": {"issuer": "https://i", "subject": "s2", "audiences": ["api://AzureADTokenExchange"]},
        },
    ]));
    let plan = prep(&t, json!({})).unwrap();
    let deps: Vec<Vec<usize>> = plan
        .resources
        .iter()
        .map(|r| r.depends_on.clone())
        .collect();
    assert_eq!(deps, vec![vec![], vec![0], vec![0]]);
    assert_eq!(
        plan.body(0, &NoReferences).unwrap(),
        json!({"location": "westus2"})
    );

    // Chained: fic2 waits for fic1 (by type/name form).
    let mut chained = t.clone();
    chained["resources"][2]["dependsOn"] = json!([
        "ua",
        "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials/ua/fic1"
    ]);
    let plan = prep(&chained, json!({})).unwrap();
    assert_eq!(plan.resources[2].depends_on, vec![0, 1]);
}

#[test]
fn copy_loop_of_50_identities() {
    let t = tpl(json!([{
        "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
        "apiVersion": "2023-01-31",
        "name": "[format('id-{0:D3}', copyIndex(1))]",
        "location": "[resourceGroup().location]",
        "tags": {"n": "[string(copyIndex())]"},
        "copy": {"name": "ids", "count": "[parameters('n')]"},
    }, {
        "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
        "apiVersion": "2023-01-31",
        "name": "after",
        "dependsOn": ["ids"],
    }]));
    let mut t = t;
    t["parameters"] = json!({"n": {"type": "int", "defaultValue": 50, "maxValue": 800}});
    let plan = prep(&t, json!({})).unwrap();
    assert_eq!(plan.resources.len(), 51);
    assert_eq!(plan.resources[0].name, "id-001");
    assert_eq!(plan.resources[49].name, "id-050");
    assert_eq!(plan.resources[49].copy, Some(("ids".to_string(), 49)));
    assert!(
        plan.resources[..50].iter().all(|r| r.depends_on.is_empty()),
        "parallel by default"
    );
    assert_eq!(plan.resources[50].depends_on, (0..50).collect::<Vec<_>>());
    assert_eq!(
        plan.body(7, &NoReferences).unwrap(),
        json!({"location": "westus2", "tags": {"n": "7"}})
    );

    // Serial with batchSize 10: each batch waits for the previous one.
    t["resources"][0]["copy"] =
        json!({"name": "ids", "count": 50, "mode": "Serial", "batchSize": 10});
    let plan = prep(&t, json!({})).unwrap();
    assert!(plan.resources[..10].iter().all(|r| r.depends_on.is_empty()));
    assert_eq!(plan.resources[10].depends_on, (0..10).collect::<Vec<_>>());
    assert_eq!(plan.resources[25].depends_on, (10..20).collect::<Vec<_>>());
}

#[test]
fn prepare_of_100_resources_is_fast_and_linear() {
    let resources: Vec<Value> = (0..100)
        .map(|i| {
            json!({
                "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
                "apiVersion": "2023-01-31",
                "name": format!("id{i}"),
                "location": "[resourceGroup().location]",
                "dependsOn": if i > 0 { vec![format!("[resourceId('Microsoft.ManagedIdentity/userAssignedIdentities', 'id{}')]", i - 1)] } else { vec![] },
            })
        })
        .collect();
    let t = tpl(Value::Array(resources));
    let plan = prep(&t, json!({})).unwrap();
    assert_eq!(plan.resources.len(), 100);
    assert_eq!(plan.resources[99].depends_on, vec![98]);
}

#[test]
fn nested_children_short_and_full_forms() {
    let t = tpl(json!([{
        "type": "Microsoft.KeyVault/vaults",
        "apiVersion": "2023-07-01",
        "name": "kv1",
        "location": "westus2",
        "properties": {"tenantId": "[subscription().tenantId]", "sku": {"family": "A", "name": "standard"}, "accessPolicies": []},
        "resources": [
            {"type": "secrets", "apiVersion": "2023-07-01", "name": "s1", "dependsOn": ["kv1"], "properties": {"value": "v"}},
            {"type": "Microsoft.KeyVault/vaults/accessPolicies", "apiVersion": "2023-07-01", "name": "kv1/add", "dependsOn": ["kv1"], "properties": {"accessPolicies": []}},
        ],
    }]));
    let plan = prep(&t, json!({})).unwrap();
    let r: Vec<(&str, &str)> = plan
        .resources
        .iter()
        .map(|r| (r.full_type.as_str(), r.name.as_str()))
        .collect();
    assert_eq!(
        r,
        vec![
            ("Microsoft.KeyVault/vaults", "kv1"),
            ("Microsoft.KeyVault/vaults/secrets", "kv1/s1"),
            ("Microsoft.KeyVault/vaults/accessPolicies", "kv1/add"),
        ]
    );
    assert_eq!(
        plan.resources[1].id,
        format!("{RG}/providers/Microsoft.KeyVault/vaults/kv1/secrets/s1")
    );
    assert_eq!(plan.resources[1].depends_on, vec![0]);
    assert_eq!(
        plan.body(0, &NoReferences).unwrap()["properties"]["tenantId"],
        json!("10000000-0000-0000-0000-000000000000")
    );
}

#[test]
fn conditions_drop_resources_and_dependencies_on_them() {
    let t = tpl(json!([
        {"type": "Microsoft.ManagedIdentity/userAssignedIdentities", "apiVersion": "2023-01-31", "name": "a", "condition": "[equals(1, 2)]"},
        {"type": "Microsoft.ManagedIdentity/userAssignedIdentities", "apiVersion": "2023-01-31", "name": "b"},
        {"type": "Microsoft.ManagedIdentity/userAssignedIdentities", "apiVersion": "2023-01-31", "name": "c", "dependsOn": ["a", "b"], "condition": true},
    ]));
    let plan = prep(&t, json!({})).unwrap();
    let names: Vec<&str> = plan.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["b", "c"]);
    assert_eq!(plan.resources[1].depends_on, vec![0]);
}

#[test]
fn implicit_dependency_from_reference_and_outputs() {
    let t = json!({
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "parameters": {"pw": {"type": "securestring", "defaultValue": "hunter2"}},
        "variables": {"uaId": "[resourceId('Microsoft.ManagedIdentity/userAssignedIdentities', 'ua')]"},
        "resources": [
            {"type": "Microsoft.ManagedIdentity/userAssignedIdentities", "apiVersion": "2023-01-31", "name": "ua", "location": "westus2"},
            {
                "type": "Microsoft.Authorization/roleAssignments",
                "apiVersion": "2022-04-01",
                "name": "[guid(variables('uaId'), 'reader')]",
                "properties": {
                    "principalId": "[reference(variables('uaId'), '2023-01-31').principalId]",
                    "clientId": "[reference('ua').clientId]",
                    "full": "[reference('ua', '2023-01-31', 'Full').location]",
                },
            },
        ],
        "outputs": {
            "principalId": {"type": "string", "value": "[reference('ua').principalId]"},
            "ids": {"type": "array", "copy": {"count": 2, "input": "[concat('x', copyIndex())]"}},
            "secret": {"type": "securestring", "value": "[parameters('pw')]"},
            "skipped": {"type": "string", "condition": false, "value": "no"},
            "n": {"type": "int", "value": "[length(variables('uaId'))]"},
        },
    });
    let plan = prep(&t, json!({})).unwrap();
    assert_eq!(plan.resources[1].depends_on, vec![0]);
    let ua_id = format!("{RG}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/ua");
    assert_eq!(plan.resources[1].name, hash::guid(&[&ua_id, "reader"]));

    // Not deployed yet: reference() fails with ARM's sentence.
    let e = plan.body(1, &NoReferences).unwrap_err();
    assert_eq!(e.code, "InvalidTemplate");
    assert!(
        e.message
            .contains(&format!("The Resource '{ua_id}' was not found.")),
        "{}",
        e.message
    );

    let store = Store(HashMap::from([(
        ua_id.to_ascii_lowercase(),
        json!({"id": ua_id, "location": "westus2", "properties": {"principalId": "p-1", "clientId": "c-1"}}),
    )]));
    assert_eq!(
        plan.body(1, &store).unwrap(),
        json!({"properties": {"principalId": "p-1", "clientId": "c-1", "full": "westus2"}})
    );
    assert_eq!(
        plan.outputs(&store).unwrap(),
        json!({
            "principalId": {"type": "String", "value": "p-1"},
            "ids": {"type": "Array", "value": ["x0", "x1"]},
            "n": {"type": "Int", "value": ua_id.len()},
        })
    );
    assert_eq!(
        plan.echoed_parameters(),
        json!({"pw": {"type": "SecureString"}})
    );
}

#[test]
fn property_copy_and_variable_copy() {
    let mut t = tpl(json!([{
        "type": "Microsoft.Compute/virtualMachines",
        "apiVersion": "2023-03-01",
        "name": "vm1",
        "properties": {
            "storageProfile": {
                "copy": [{"name": "dataDisks", "count": 3, "input": {"lun": "[copyIndex('dataDisks')]", "name": "[concat('d', copyIndex('dataDisks', 1))]"}}],
            },
            "tags": "[variables('tagList')]",
        },
    }]));
    t["variables"] = json!({
        "copy": [{"name": "tagList", "count": 2, "input": "[concat('t', copyIndex('tagList'))]"}],
        "b": "[concat(variables('a'), '-b')]",
        "a": "[toUpper('a')]",
    });
    let plan = prep(&t, json!({})).unwrap();
    let b = plan.body(0, &NoReferences).unwrap();
    assert_eq!(
        b["properties"]["storageProfile"]["dataDisks"],
        json!([{"lun": 0, "name": "d1"}, {"lun": 1, "name": "d2"}, {"lun": 2, "name": "d3"}])
    );
    assert_eq!(b["properties"]["tags"], json!(["t0", "t1"]));
    assert_eq!(plan.vars["b"], json!("A-b"));
}

#[test]
fn parameters_defaults_types_and_constraints() {
    let mut t = tpl(json!([]));
    t["parameters"] = json!({
        "name": {"type": "String", "minLength": 3, "maxLength": 5},
        "size": {"type": "string", "allowedValues": ["S", "M"], "defaultValue": "M"},
        "count": {"type": "int", "minValue": 1, "maxValue": 3, "defaultValue": 2},
        "loc": {"type": "string", "defaultValue": "[resourceGroup().location]"},
        "derived": {"type": "string", "defaultValue": "[concat(parameters('name'), '-', parameters('loc'))]"},
        "stamp": {"type": "string", "defaultValue": "[utcNow()]"},
        "g": {"type": "string", "defaultValue": "[newGuid()]"},
        "flags": {"type": "array", "allowedValues": ["a", "b"], "defaultValue": ["a"]},
        "obj": {"type": "object", "defaultValue": {"k": 1}},
        "on": {"type": "bool", "defaultValue": true},
    });
    let plan = prep(&t, json!({"NAME": {"value": "abcd"}})).unwrap();
    let e = plan.echoed_parameters();
    assert_eq!(e["name"], json!({"type": "String", "value": "abcd"}));
    assert_eq!(e["size"]["value"], json!("M"));
    assert_eq!(e["count"], json!({"type": "Int", "value": 2}));
    assert_eq!(e["derived"]["value"], json!("abcd-westus2"));
    assert_eq!(e["stamp"]["value"], json!("20240229T130509Z"));
    assert_eq!(e["g"]["value"].as_str().unwrap().len(), 36);
    assert_eq!(e["on"], json!({"type": "Bool", "value": true}));
    assert_eq!(e["obj"], json!({"type": "Object", "value": {"k": 1}}));

    let cases: Vec<(Value, &str)> = vec![
        (json!({}), "The value for the template parameter 'name' at line '1' and column '1' is not provided. Please see https://aka.ms/arm-create-parameter-file for usage details."),
        (json!({"name": {"value": 12}}), "Template parameter JToken type is not valid. Expected 'String'. Actual 'Integer'. Please see https://aka.ms/arm-create-parameter-file for usage details."),
        (json!({"name": {"value": "abc"}, "count": {"value": "2"}}), "Template parameter JToken type is not valid. Expected 'Integer'. Actual 'String'. Please see https://aka.ms/arm-create-parameter-file for usage details."),
        (json!({"name": {"value": "ab"}}), "Length of the value should be greater than or equal to '3'."),
        (json!({"name": {"value": "abcdef"}}), "Length of the value should be less than or equal to '5'."),
        (json!({"name": {"value": "abc"}, "size": {"value": "L"}}), "The provided value 'L' for the template parameter 'size' at line '1' and column '1' is not valid. The parameter value is not part of the allowed value(s): 'S,M'."),
        (json!({"name": {"value": "abc"}, "flags": {"value": ["a", "c"]}}), "is not part of the allowed value(s): 'a,b'"),
        (json!({"name": {"value": "abc"}, "count": {"value": 0}}), "The value should be greater than or equal to '1'."),
        (json!({"name": {"value": "abc"}, "count": {"value": 4}}), "The value should be less than or equal to '3'."),
        (json!({"name": {"value": "abc"}, "nope": {"value": 1}, "other": {"value": 2}}), "The template parameters 'nope, other' in the parameters file are not valid; they are not present in the original template and can therefore not be provided at deployment time. The only supported parameters for this template are '"),
        (json!({"name": {"reference": {"keyVault": {"id": "/x"}, "secretName": "s"}}}), "is a Key Vault reference that was not resolved"),
    ];
    for (p, want) in cases {
        let e = err(&t, p.clone());
        assert_eq!(e.code, "InvalidTemplate", "{p}");
        assert!(
            e.message
                .starts_with("Deployment template validation failed: '"),
            "{}",
            e.message
        );
        assert!(e.message.contains(want), "{p}: {}", e.message);
    }
}

#[test]
fn bad_templates_from_the_issue() {
    let id = |name: &str, extra: Value| {
        let mut r = json!({"type": "Microsoft.ManagedIdentity/userAssignedIdentities", "apiVersion": "2023-01-31", "name": name});
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    };
    // Unknown function (in the properties: caught before anything is deployed).
    let e = err(
        &tpl(json!([id("a", json!({"properties": {"x": "[foo('1')]"}}))])),
        json!({}),
    );
    assert_eq!(e.code, "InvalidTemplate");
    assert_eq!(
        e.message,
        "Deployment template language expression evaluation failed: 'The template function 'foo' is not valid. Please see https://aka.ms/arm-functions for usage details.'."
    );
    let e = err(
        &tpl(json!([id(
            "a",
            json!({"properties": {"x": "[concat(reference('a').x, bar())]"}})
        )])),
        json!({}),
    );
    assert!(
        e.message
            .contains("The template function 'bar' is not valid."),
        "{}",
        e.message
    );
    // Cycle.
    let e = err(
        &tpl(json!([
            id("a", json!({"dependsOn": ["b"]})),
            id("b", json!({"dependsOn": ["a"]}))
        ])),
        json!({}),
    );
    assert!(
        e.message.starts_with("Deployment template validation failed: 'Circular dependency detected on resource: '/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/Rg1/providers/Microsoft.ManagedIdentity/userAssignedIdentities/"),
        "{}",
        e.message
    );
    assert!(
        e.message
            .ends_with("'. Please see https://aka.ms/arm-syntax-resources for usage details.'."),
        "{}",
        e.message
    );
    let e = err(
        &tpl(json!([id("a", json!({"dependsOn": ["a"]}))])),
        json!({}),
    );
    assert!(
        e.message.contains("Circular dependency detected"),
        "{}",
        e.message
    );
    // Unknown dependsOn.
    let e = err(
        &tpl(json!([id("a", json!({"dependsOn": ["ghost"]}))])),
        json!({}),
    );
    assert_eq!(
        e.message,
        "Deployment template validation failed: 'The resource 'ghost' is not defined in the template. Please see https://aka.ms/arm-syntax for usage details.'."
    );
    // Wrong segment counts.
    let e = err(
        &tpl(
            json!([{"type": "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials", "apiVersion": "2023-01-31", "name": "fic"}]),
        ),
        json!({}),
    );
    assert!(e.message.contains("The template resource 'fic' for type 'Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials' at line '1' and column '1' has incorrect segment lengths."), "{}", e.message);
    let e = err(
        &tpl(json!([id(
            "p",
            json!({"resources": [{"type": "federatedIdentityCredentials", "apiVersion": "x", "name": "p/c"}]})
        )])),
        json!({}),
    );
    assert!(
        e.message.contains("has incorrect segment lengths"),
        "{}",
        e.message
    );
    // Missing $schema, resources not an array.
    let mut t = tpl(json!([]));
    t.as_object_mut().unwrap().remove("$schema");
    assert!(err(&t, json!({})).message.contains("'$schema'"));
    let e = err(&tpl(json!({"a": 1})), json!({}));
    assert!(
        e.message.contains("'resources' must be an array"),
        "{}",
        e.message
    );
    // Duplicate resource.
    let e = err(
        &tpl(json!([id("a", json!({})), id("A", json!({}))])),
        json!({}),
    );
    assert!(
        e.message
            .contains("is defined multiple times in a template"),
        "{}",
        e.message
    );
    // utcNow outside a parameter default.
    let e = eval1("[utcNow()]").unwrap_err();
    assert!(
        e.message
            .contains("The template function 'utcNow' is not expected at this location."),
        "{}",
        e.message
    );
    // reference in a name.
    let e = err(
        &tpl(json!([id("[reference('x').name]", json!({}))])),
        json!({}),
    );
    assert!(
        e.message
            .contains("The template function 'reference' is not expected at this location."),
        "{}",
        e.message
    );
    // listKeys is not served.
    let e = eval1("[listKeys('a', '2023-01-01').keys[0].value]").unwrap_err();
    assert!(
        e.message.contains("not supported by Keyless"),
        "{}",
        e.message
    );
    // Wrong arity.
    let e = eval1("[length('a', 'b')]").unwrap_err();
    assert!(
        e.message
            .contains("function requires 1 argument(s) while 2 were provided"),
        "{}",
        e.message
    );
    // Nested copy, copyIndex outside a loop, unknown parameter in an expression.
    let e = err(
        &tpl(json!([id(
            "p",
            json!({"resources": [{"type": "c", "apiVersion": "x", "name": "c", "copy": {"name": "l", "count": 2}}]})
        )])),
        json!({}),
    );
    assert!(
        e.message
            .contains("Copying nested resources is not supported"),
        "{}",
        e.message
    );
    let e = eval1("[copyIndex()]").unwrap_err();
    assert!(
        e.message
            .contains("'copyIndex' is not expected at this location"),
        "{}",
        e.message
    );
    let e = eval1("[parameters('nope')]").unwrap_err();
    assert!(
        e.message
            .contains("The template parameter 'nope' is not found."),
        "{}",
        e.message
    );
    // Expression syntax.
    let e = eval1("[concat('a']").unwrap_err();
    assert!(e.message.contains("is not valid"), "{}", e.message);
    // Copy count over ARM's limit.
    let e = err(
        &tpl(json!([id(
            "[string(copyIndex())]",
            json!({"copy": {"name": "l", "count": 801}})
        )])),
        json!({}),
    );
    assert!(e.message.contains("cannot exceed '800'"), "{}", e.message);
}

#[test]
fn functions_evaluate_like_arm() {
    let cases: Vec<(&str, Value)> = vec![
        ("[concat('a', 1, true())]", json!("a1True")),
        ("[concat(createArray(1, 2), createArray(3))]", json!([1, 2, 3])),
        ("[format('{0}-{1:D2}', 'x', 5)]", json!("x-05")),
        ("[resourceId('Microsoft.X/a/b', 'n1', 'n2')]", json!(format!("{RG}/providers/Microsoft.X/a/n1/b/n2"))),
        ("[resourceId('rg2', 'Microsoft.X/a', 'n1')]", json!("/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg2/providers/Microsoft.X/a/n1")),
        ("[resourceId('s2', 'rg2', 'Microsoft.X/a', 'n1')]", json!("/subscriptions/s2/resourceGroups/rg2/providers/Microsoft.X/a/n1")),
        ("[subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'r1')]", json!("/subscriptions/00000000-0000-0000-0000-000000000001/providers/Microsoft.Authorization/roleDefinitions/r1")),
        ("[tenantResourceId('Microsoft.Authorization/policyDefinitions', 'p')]", json!("/providers/Microsoft.Authorization/policyDefinitions/p")),
        ("[extensionResourceId('/x/y', 'Microsoft.Authorization/locks', 'l')]", json!("/x/y/providers/Microsoft.Authorization/locks/l")),
        ("[resourceGroup()]", json!({"id": RG, "name": "Rg1", "type": "Microsoft.Resources/resourceGroups", "location": "westus2", "properties": {"provisioningState": "Succeeded"}})),
        ("[subscription().subscriptionId]", json!("00000000-0000-0000-0000-000000000001")),
        ("[tenant().tenantId]", json!("10000000-0000-0000-0000-000000000000")),
        ("[deployment().name]", json!("dep1")),
        ("[uniqueString('test')]", json!("rbgf3xv4ufgzg")),
        ("[guid('a', 'b')]", json!("2d796349-8c7e-55ec-9624-54ece82ed031")),
        ("[toLower('AbC')]", json!("abc")),
        ("[toUpper('AbC')]", json!("ABC")),
        ("[if(equals(1, 1), 'y', div(1, 0))]", json!("y")),
        ("[and(true(), not(false()))]", json!(true)),
        ("[or(false(), false())]", json!(false)),
        ("[empty('')]", json!(true)),
        ("[empty(createObject('a', 1))]", json!(false)),
        ("[length(createArray(1, 2, 3))]", json!(3)),
        ("[contains('abc', 'b')]", json!(true)),
        ("[contains(createObject('Key', 1), 'key')]", json!(true)),
        ("[contains(createArray(1, 2), 3)]", json!(false)),
        ("[string(createObject('a', 1))]", json!("{\"a\":1}")),
        ("[int('42')]", json!(42)),
        ("[bool('True')]", json!(true)),
        ("[json('{\"a\": [1]}').a[0]]", json!(1)),
        ("[createObject('a', 1, 'b', 'x').b]", json!("x")),
        ("[createObject('a', 1)['a']]", json!(1)),
        ("[union(createObject('a', createObject('x', 1)), createObject('a', createObject('y', 2)))]", json!({"a": {"x": 1, "y": 2}})),
        ("[union(createArray(1, 2), createArray(2, 3))]", json!([1, 2, 3])),
        ("[coalesce(null(), 'x')]", json!("x")),
        ("[replace('a-b-c', '-', '')]", json!("abc")),
        ("[substring('hello', 1, 3)]", json!("ell")),
        ("[trim('  x ')]", json!("x")),
        ("[split('a,b;c', createArray(',', ';'))]", json!(["a", "b", "c"])),
        ("[join(createArray('a', 'b'), '/')]", json!("a/b")),
        ("[first(createArray(1, 2))]", json!(1)),
        ("[last('abc')]", json!("c")),
        ("[add(1, 2)]", json!(3)),
        ("[sub(1, 2)]", json!(-1)),
        ("[mul(3, 4)]", json!(12)),
        ("[div(7, 2)]", json!(3)),
        ("[mod(7, 2)]", json!(1)),
        ("[greater(2, 1)]", json!(true)),
        ("[greaterOrEquals(1, 1)]", json!(true)),
        ("[less('a', 'b')]", json!(true)),
        ("[lessOrEquals(2, 1)]", json!(false)),
        ("[startsWith('Hello', 'he')]", json!(true)),
        ("[endsWith('Hello', 'LO')]", json!(true)),
        ("[indexOf('abcabc', 'c')]", json!(2)),
        ("[padLeft('7', 3, '0')]", json!("007")),
        ("[take(createArray(1, 2, 3), 2)]", json!([1, 2])),
        ("[skip('abc', 1)]", json!("bc")),
        ("[range(2, 3)]", json!([2, 3, 4])),
        ("[base64('hi')]", json!("aGk=")),
        ("[base64ToString('aGk=')]", json!("hi")),
        ("[CONCAT('case', 'insensitive')]", json!("caseinsensitive")),
        ("[[not an expression]", json!("[not an expression]")),
        ("['it''s']", json!("it's")),
    ];
    for (e, want) in cases {
        assert_eq!(
            eval1(e).unwrap_or_else(|x| panic!("{e}: {}", x.message)),
            want,
            "{e}"
        );
    }
}

#[test]
fn reference_by_unknown_name_and_member_errors() {
    let e = eval1("[reference('ghost').x]").unwrap_err();
    assert!(
        e.message
            .contains("The template reference 'ghost' is not valid"),
        "{}",
        e.message
    );
    let e = eval1("[createObject('a', 1).b]").unwrap_err();
    assert!(
        e.message.contains(
            "The language expression property 'b' doesn't exist, available properties are 'a'."
        ),
        "{}",
        e.message
    );
}

#[test]
fn template_hash_is_a_stable_decimal() {
    let a = parse_jsonc(SEED_003).unwrap();
    let h = Plan::template_hash(&a);
    assert!(h.chars().all(|c| c.is_ascii_digit()) && !h.is_empty());
    assert_eq!(h, Plan::template_hash(&parse_jsonc(SEED_003).unwrap()));
    assert_ne!(h, Plan::template_hash(&tpl(json!([]))));
}

#[test]
fn plan_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Plan>();
}

const SUB: &str = "/subscriptions/00000000-0000-0000-0000-000000000001";

/// `az deployment sub create --location eastus`.
fn sub_scope() -> Scope {
    Scope {
        level: Level::Subscription,
        location: Some("eastus".into()),
        resource_group: String::new(),
        resource_group_location: String::new(),
        ..scope()
    }
}

fn sub_prep(t: &Value, p: Value) -> Result<Plan, TemplateError> {
    Plan::prepare_at(t, &p, &sub_scope(), 1_709_211_909, 7)
}

fn sub_tpl(resources: Value) -> Value {
    json!({
        "$schema": "https://schema.management.azure.com/schemas/2018-05-01/subscriptionDeploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "resources": resources,
    })
}

/// The nested template of [`subscription_template_with_group_and_inner_nested_deployment`]: its
/// expressions are its own (parameters it declares, resourceGroup()).
fn inner_template() -> Value {
    json!({
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "parameters": {"name": {"type": "string"}, "loc": {"type": "string"}},
        "resources": [{
            "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
            "apiVersion": "2023-01-31",
            "name": "[parameters('name')]",
            "location": "[resourceGroup().location]",
        }],
        "outputs": {
            "principalId": {
                "type": "string",
                "value": "[reference(parameters('name')).principalId]",
            },
        },
    })
}

#[test]
fn subscription_template_with_group_and_inner_nested_deployment() {
    let t = json!({
        "$schema": "https://schema.management.azure.com/schemas/2018-05-01/subscriptionDeploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "parameters": {
            "rgName": {"type": "string", "defaultValue": "rg1"},
            "idName": {"type": "string"},
            "location": {"type": "string", "defaultValue": "[deployment().location]"},
        },
        "resources": [
            {
                "type": "Microsoft.Resources/resourceGroups",
                "apiVersion": "2022-09-01",
                "name": "[parameters('rgName')]",
                "location": "[parameters('location')]",
            },
            {
                "type": "Microsoft.Resources/deployments",
                "apiVersion": "2022-09-01",
                "name": "idDeploy",
                "resourceGroup": "[parameters('rgName')]",
                "subscriptionId": "[subscription().subscriptionId]",
                "dependsOn": ["[resourceId('Microsoft.Resources/resourceGroups', parameters('rgName'))]"],
                "properties": {
                    "mode": "Incremental",
                    "expressionEvaluationOptions": {"scope": "Inner"},
                    "parameters": {
                        "name": {"value": "[parameters('idName')]"},
                        "loc": {"value": "[parameters('location')]"},
                    },
                    "template": inner_template(),
                },
            },
            {
                "type": "Microsoft.Authorization/roleAssignments",
                "apiVersion": "2022-04-01",
                "name": "[guid(subscription().id, parameters('idName'))]",
                "properties": {
                    "roleDefinitionId": "[subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'acdd72a7-3385-48ef-bd42-f606fba81ae7')]",
                    "principalId": "[reference('idDeploy').outputs.principalId.value]",
                },
            },
        ],
        "outputs": {
            "rgId": {"type": "string", "value": "[subscriptionResourceId('Microsoft.Resources/resourceGroups', parameters('rgName'))]"},
            "rgId2": {"type": "string", "value": "[resourceId('Microsoft.Resources/resourceGroups', parameters('rgName'))]"},
            "deploymentLocation": {"type": "string", "value": "[deployment().location]"},
        },
    });
    let plan = sub_prep(&t, json!({"idName": {"value": "uai-sub"}})).unwrap();
    let rg = format!("{SUB}/resourceGroups/rg1");
    let nested = format!("{rg}/providers/Microsoft.Resources/deployments/idDeploy");
    let guid = hash::guid(&[SUB, "uai-sub"]);
    let ra = format!("{SUB}/providers/Microsoft.Authorization/roleAssignments/{guid}");
    let ids: Vec<&str> = plan.resources.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, [rg.as_str(), nested.as_str(), ra.as_str()]);
    let deps: Vec<&[usize]> = plan.resources.iter().map(|r| &r.depends_on[..]).collect();
    assert_eq!(deps, [&[][..], &[0][..], &[1][..]]);
    assert_eq!(
        plan.resources[1].full_type,
        "Microsoft.Resources/deployments"
    );
    assert_eq!(plan.resources[1].name, "idDeploy");

    assert_eq!(
        plan.body(0, &NoReferences).unwrap(),
        json!({"location": "eastus"})
    );
    // The nested deployment: where it goes is in its id, not its body; the inner template raw.
    assert_eq!(
        plan.body(1, &NoReferences).unwrap(),
        json!({
            "properties": {
                "mode": "Incremental",
                "expressionEvaluationOptions": {"scope": "Inner"},
                "parameters": {
                    "name": {"value": "uai-sub"},
                    "loc": {"value": "eastus"},
                },
                "template": inner_template(),
            },
        })
    );
    // reference() of a nested deployment: its properties, as the server's GET gives them.
    let store = Store(HashMap::from([(
        nested.to_ascii_lowercase(),
        json!({"id": nested, "name": "idDeploy", "properties": {
            "provisioningState": "Succeeded",
            "outputs": {"principalId": {"type": "String", "value": "p-123"}},
        }}),
    )]));
    assert_eq!(
        plan.body(2, &store).unwrap(),
        json!({"properties": {
            "roleDefinitionId": format!("{SUB}/providers/Microsoft.Authorization/roleDefinitions/acdd72a7-3385-48ef-bd42-f606fba81ae7"),
            "principalId": "p-123",
        }})
    );
    assert_eq!(
        plan.outputs(&store).unwrap(),
        json!({
            "rgId": {"type": "String", "value": rg},
            "rgId2": {"type": "String", "value": rg},
            "deploymentLocation": {"type": "String", "value": "eastus"},
        })
    );
}

#[test]
fn subscription_level_ids_and_functions() {
    let t = sub_tpl(json!([{
        "type": "Microsoft.Resources/resourceGroups",
        "apiVersion": "2022-09-01",
        "name": "rg1",
        "location": "eastus",
        "properties": {
            "noGroup": "[resourceId('Microsoft.ManagedIdentity/userAssignedIdentities', 'u1')]",
            "group": "[resourceId('rg2', 'Microsoft.ManagedIdentity/userAssignedIdentities', 'u1')]",
            "other": "[resourceId('sub2', 'rg2', 'Microsoft.ManagedIdentity/userAssignedIdentities', 'u1')]",
            "sub": "[subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'r1')]",
            "deployment": "[deployment().name]",
        },
    }, {
        "type": "Microsoft.Authorization/roleAssignments",
        "apiVersion": "2022-04-01",
        "name": "ra1",
        "dependsOn": ["rg1"],
        "properties": {},
    }, {
        "type": "Microsoft.Resources/deployments",
        "apiVersion": "2022-09-01",
        "name": "atSub",
        "dependsOn": ["Microsoft.Resources/resourceGroups/rg1"],
        "properties": {"mode": "Incremental", "template": {"resources": []}},
    }]));
    let plan = sub_prep(&t, json!({})).unwrap();
    let ids: Vec<&str> = plan.resources.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            format!("{SUB}/resourceGroups/rg1"),
            format!("{SUB}/providers/Microsoft.Authorization/roleAssignments/ra1"),
            format!("{SUB}/providers/Microsoft.Resources/deployments/atSub"),
        ]
    );
    assert_eq!(plan.resources[1].depends_on, [0]);
    assert_eq!(plan.resources[2].depends_on, [0]);
    let b = plan.body(0, &NoReferences).unwrap();
    assert_eq!(
        b["properties"],
        json!({
            "noGroup": format!("{SUB}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u1"),
            "group": format!("{SUB}/resourceGroups/rg2/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u1"),
            "other": "/subscriptions/sub2/resourceGroups/rg2/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u1",
            "sub": format!("{SUB}/providers/Microsoft.Authorization/roleDefinitions/r1"),
            "deployment": "dep1",
        })
    );

    // At resource-group level deployment() has no location; resourceId() names the group's.
    let rg_level = eval1("[deployment()]").unwrap();
    assert!(rg_level.get("location").is_none(), "{rg_level}");
    assert_eq!(
        eval1("[resourceId('Microsoft.ManagedIdentity/userAssignedIdentities', 'u1')]").unwrap(),
        json!(format!(
            "{RG}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u1"
        ))
    );
}

#[test]
fn resource_group_function_is_refused_at_subscription_level() {
    let expected = "Deployment template language expression evaluation failed: 'The template function 'RESOURCEGROUP' is not expected at this location. Please see https://aka.ms/arm-template-expressions for usage details.'.";
    // In a resource's body.
    let t = sub_tpl(json!([{
        "type": "Microsoft.Resources/resourceGroups",
        "apiVersion": "2022-09-01",
        "name": "rg1",
        "location": "[resourceGroup().location]",
    }]));
    let e = sub_prep(&t, json!({})).unwrap_err();
    assert_eq!(e.code, "InvalidTemplate");
    assert_eq!(e.message, expected);
    assert_eq!(
        e.target.as_deref(),
        Some(&*format!("{SUB}/resourceGroups/rg1"))
    );
    // In a variable and in an output.
    let mut t = sub_tpl(json!([]));
    t["variables"] = json!({"v": "[resourceGroup().name]"});
    let e = sub_prep(&t, json!({})).unwrap_err();
    assert_eq!(
        (e.message.as_str(), e.target.as_deref()),
        (expected, Some("variables.v"))
    );
    let mut t = sub_tpl(json!([]));
    t["outputs"] = json!({"o": {"type": "string", "value": "[resourceGroup().id]"}});
    let e = sub_prep(&t, json!({})).unwrap_err();
    assert_eq!(
        (e.message.as_str(), e.target.as_deref()),
        (expected, Some("outputs.o"))
    );
    // Inside an inner-scope nested template it is the nested template's business.
    let t = sub_tpl(json!([{
        "type": "Microsoft.Resources/deployments",
        "apiVersion": "2022-09-01",
        "name": "n",
        "resourceGroup": "rg1",
        "properties": {
            "mode": "Incremental",
            "expressionEvaluationOptions": {"scope": "inner"},
            "template": {"resources": [], "outputs": {"o": {"type": "string", "value": "[resourceGroup().id]"}}},
        },
    }]));
    sub_prep(&t, json!({})).unwrap();
    // ... but not in an outer-scope one (evaluated here).
    let mut t = t;
    t["resources"][0]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("expressionEvaluationOptions");
    assert_eq!(sub_prep(&t, json!({})).unwrap_err().message, expected);
}

#[test]
fn outer_scope_nested_template_is_evaluated_here() {
    let mut t = tpl(json!([
        {
            "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
            "apiVersion": "2023-01-31",
            "name": "[parameters('idName')]",
            "location": "westus2",
        },
        {
            "type": "Microsoft.Resources/deployments",
            "apiVersion": "2022-09-01",
            "name": "outer",
            "dependsOn": ["[parameters('idName')]"],
            "properties": {
                "mode": "Incremental",
                "expressionEvaluationOptions": {"scope": "outer"},
                "template": {
                    "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
                    "contentVersion": "1.0.0.0",
                    "parameters": {"ignored": {"type": "string", "defaultValue": "x"}},
                    "resources": [{
                        "type": "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials",
                        "apiVersion": "2023-01-31",
                        "name": "[concat(parameters('idName'), '/fic1')]",
                        "properties": {
                            "issuer": "[reference(resourceId('Microsoft.ManagedIdentity/userAssignedIdentities', parameters('idName'))).clientId]",
                            "subject": "[[parameters('ignored')]",
                            "audiences": ["api://AzureADTokenExchange"],
                        },
                    }],
                },
            },
        },
        {
            "type": "Microsoft.Resources/deployments",
            "apiVersion": "2022-09-01",
            "name": "elsewhere",
            "resourceGroup": "Other",
            "properties": {"mode": "Incremental", "template": {"resources": []}},
        },
    ]));
    t["parameters"] = json!({"idName": {"type": "string"}});
    let plan = prep(&t, json!({"idName": {"value": "uai1"}})).unwrap();
    let ids: Vec<&str> = plan.resources.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            format!("{RG}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/uai1"),
            format!("{RG}/providers/Microsoft.Resources/deployments/outer"),
            format!(
                "{SUB}/resourceGroups/Other/providers/Microsoft.Resources/deployments/elsewhere"
            ),
        ]
    );
    assert_eq!(plan.resources[1].depends_on, [0]);
    assert!(plan.resources[2].depends_on.is_empty());
    let id = &plan.resources[0].id;
    let store = Store(HashMap::from([(
        id.to_ascii_lowercase(),
        json!({"id": id, "properties": {"clientId": "c-1"}}),
    )]));
    let b = plan.body(1, &store).unwrap();
    assert_eq!(
        b["properties"]["template"]["resources"][0],
        json!({
            "type": "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials",
            "apiVersion": "2023-01-31",
            "name": "uai1/fic1",
            "properties": {
                "issuer": "c-1",
                // Evaluated here to the literal "[parameters('ignored')]", escaped again so that
                // the nested deployment reads the same literal (ARM does not evaluate it twice).
                "subject": "[[parameters('ignored')]",
                "audiences": ["api://AzureADTokenExchange"],
            },
        })
    );
    assert_eq!(
        b["properties"]["expressionEvaluationOptions"],
        json!({"scope": "outer"})
    );
    assert_eq!(
        plan.body(2, &NoReferences).unwrap(),
        json!({"properties": {"mode": "Incremental", "template": {"resources": []}}})
    );
}

#[test]
fn nested_deployment_errors() {
    let nested = |extra: Value| {
        let mut r = json!({
            "type": "Microsoft.Resources/deployments",
            "apiVersion": "2022-09-01",
            "name": "n",
            "properties": {
                "mode": "Incremental",
                "expressionEvaluationOptions": {"scope": "inner"},
                "parameters": {"p": {"value": "[parameters('p')]"}},
                "template": {"resources": [], "outputs": {"o": {"type": "string", "value": "[parameters('p')]"}}},
            },
        });
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        tpl(json!([r]))
    };
    // Inner scope: the nested template's parameters() are its own, but the parameters passed
    // to it are evaluated here.
    let e = err(&nested(json!({})), json!({}));
    assert_eq!(e.code, "InvalidTemplate");
    assert!(
        e.message
            .contains("The template parameter 'p' is not found."),
        "{}",
        e.message
    );
    let mut ok = nested(json!({}));
    ok["parameters"] = json!({"p": {"type": "string"}});
    let plan = prep(&ok, json!({"p": {"value": "v"}})).unwrap();
    assert_eq!(
        plan.body(0, &NoReferences).unwrap()["properties"]["parameters"],
        json!({"p": {"value": "v"}})
    );
    // Another subscription.
    let mut t = nested(json!({"subscriptionId": "00000000-0000-0000-0000-000000000002"}));
    t["parameters"] = json!({"p": {"type": "string", "defaultValue": "v"}});
    let e = err(&t, json!({}));
    assert!(
        e.message
            .contains("targets subscription '00000000-0000-0000-0000-000000000002'"),
        "{}",
        e.message
    );
    // Its own subscription (any case) is fine; its dependsOn is still checked.
    let mut t = nested(json!({
        "subscriptionId": "00000000-0000-0000-0000-000000000001".to_uppercase(),
        "dependsOn": ["missing"],
    }));
    t["parameters"] = json!({"p": {"type": "string", "defaultValue": "v"}});
    let e = err(&t, json!({}));
    assert!(
        e.message
            .contains("The resource 'missing' is not defined in the template."),
        "{}",
        e.message
    );
    // An unknown evaluation scope.
    let mut t = nested(json!({}));
    t["parameters"] = json!({"p": {"type": "string", "defaultValue": "v"}});
    t["resources"][0]["properties"]["expressionEvaluationOptions"]["scope"] = json!("middle");
    let e = err(&t, json!({}));
    assert!(
        e.message
            .contains("invalid expression evaluation scope 'middle'"),
        "{}",
        e.message
    );
}

// ---- Limits: one request must not crash or exhaust the server through the evaluator. ----

/// Runs `f` on a thread with a tokio worker's stack (2 MiB), as the server evaluates templates.
fn on_small_stack<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn_scoped(s, f)
            .unwrap()
            .join()
            .unwrap()
    })
}

fn with_variables(vars: Value) -> Value {
    let mut t = tpl(json!([]));
    t["variables"] = vars;
    t
}

/// The message of a refused one-expression template.
fn eval_err(expr: &str) -> String {
    eval1(expr)
        .expect_err("expression should be refused")
        .message
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    on_small_stack(|| {
        // 3,000 nested calls in a variable (24 KB): the parser's limit, not a stack overflow.
        let deep = |n: usize| format!("[{}'x'{}]", "concat(".repeat(n), ")".repeat(n));
        let e = err(&with_variables(json!({"v": deep(3_000)})), json!({}));
        assert_eq!(e.code, "InvalidTemplate");
        assert!(
            e.message.contains("more than '64' levels deep"),
            "{}",
            e.message
        );
        // 64 levels evaluate.
        let plan = prep(&with_variables(json!({"v": deep(64)})), json!({})).unwrap();
        assert_eq!(plan.vars["v"], json!("x"));

        // 2,000 variables each reading the previous: ARM's variable limit.
        let mut vars = Map::new();
        for i in 0..2_000 {
            vars.insert(
                format!("v{i:04}"),
                json!(format!("[variables('v{:04}')]", i + 1)),
            );
        }
        vars.insert("v2000".into(), json!("end"));
        let e = err(&with_variables(Value::Object(vars)), json!({}));
        assert!(
            e.message.contains(
                "The number of template variables limit exceeded. Limit: '512' and actual: '2001'."
            ),
            "{}",
            e.message
        );
        // 500 of them (within the limit): the chain limit.
        let mut vars = Map::new();
        for i in 0..500 {
            vars.insert(
                format!("v{i:03}"),
                json!(format!("[variables('v{:03}')]", i + 1)),
            );
        }
        vars.insert("v500".into(), json!("end"));
        let e = err(&with_variables(Value::Object(vars)), json!({}));
        assert!(
            e.message.contains("chain of more than '32' variables"),
            "{}",
            e.message
        );
        // A chain of 30 resolves.
        let mut vars = Map::new();
        for i in 0..30 {
            vars.insert(
                format!("v{i:03}"),
                json!(format!("[variables('v{:03}')]", i + 1)),
            );
        }
        vars.insert("v030".into(), json!("end"));
        let plan = prep(&with_variables(Value::Object(vars)), json!({})).unwrap();
        assert_eq!(plan.vars["v000"], json!("end"));

        // Chains of deep expressions: the evaluation depth limit (calls, objects, references
        // together), reached long before the stack is.
        let mut vars = Map::new();
        for i in 0..31 {
            let inner = format!("variables('v{:03}')", i + 1);
            let e = format!("[{}{inner}{}]", "concat(".repeat(60), ")".repeat(60));
            vars.insert(format!("v{i:03}"), json!({"a": {"b": {"c": e}}}));
        }
        vars.insert("v031".into(), json!("end"));
        let e = err(&with_variables(Value::Object(vars)), json!({}));
        assert!(
            e.message.contains("exceed the limit of '160' levels"),
            "{}",
            e.message
        );
    });
}

#[test]
fn long_member_chains_are_flat() {
    on_small_stack(|| {
        // 10,000 member accesses: parsed in a loop, evaluated in a loop, dropped flat.
        let e = eval_err(&format!("[json('{{}}'){}]", ".b".repeat(10_000)));
        assert!(
            e.contains("The language expression property 'b' doesn't exist"),
            "{e}"
        );
        // Reading deep into a variable: only the part reached is copied.
        let mut v = json!("leaf");
        for _ in 0..60 {
            v = json!({"a": v});
        }
        let mut t = tpl(json!([{
            "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
            "apiVersion": "2023-01-31",
            "name": "id1",
            "properties": {"v": format!("[variables('deep'){}]", ".a".repeat(60))},
        }]));
        t["variables"] = json!({"deep": v});
        let plan = prep(&t, json!({})).unwrap();
        assert_eq!(
            plan.body(0, &NoReferences).unwrap()["properties"]["v"],
            json!("leaf")
        );
    });
}

#[test]
fn expression_length_is_arms_limit() {
    let ok = format!("['{}']", "a".repeat(24_576 - 4));
    assert_eq!(eval1(&ok).unwrap().as_str().map(str::len), Some(24_572));
    let e = eval_err(&format!("['{}']", "a".repeat(24_576 - 3)));
    assert!(
        e.contains(
            "The language expression length limit exceeded. Limit: '24576' and actual: '24577'."
        ),
        "{e}"
    );
}

#[test]
fn values_nest_at_most_64_levels() {
    // Each variable wraps the previous one: depth grows without deep evaluation.
    let mut vars = Map::new();
    vars.insert("v000".into(), json!("x"));
    for i in 1..200 {
        vars.insert(
            format!("v{i:03}"),
            json!(format!("[createArray(variables('v{:03}'))]", i - 1)),
        );
    }
    let e = err(&with_variables(Value::Object(vars)), json!({}));
    assert!(
        e.message
            .contains("produced a value nested more than '64' levels deep"),
        "{}",
        e.message
    );
}

#[test]
fn huge_results_are_refused_before_they_are_allocated() {
    for (expr, want) in [
        (
            "[format('{0:F99999999999}', 1)]",
            "format string that is not valid",
        ),
        ("[format('{0:D100}', 1)]", "format string that is not valid"),
        ("[format('{0:X100}', 1)]", "format string that is not valid"),
        ("[format('{0:N100}', 1)]", "format string that is not valid"),
        (
            "[format('{0,70000}', 'x')]",
            "alignment beyond the limit of '16384'",
        ),
        (
            "[format('{0,-70000}', 'x')]",
            "alignment beyond the limit of '16384'",
        ),
        (
            "[padLeft('a', 3000000000)]",
            "total width '3000000000' beyond the limit of '16384'",
        ),
        ("[padLeft('a', 16385)]", "beyond the limit of '16384'"),
        (
            "[replace('abc', '', 'x')]",
            "cannot replace an empty string",
        ),
    ] {
        let e = eval_err(expr);
        assert!(e.contains(want), "{expr}: {e}");
    }
    // Within the limits.
    assert_eq!(
        eval1("[length(padLeft('a', 16384, '0'))]").unwrap(),
        json!(16384)
    );
    assert_eq!(
        eval1("[format('{0,3}|{0,-3}|', 7)]").unwrap(),
        json!("  7|7  |")
    );
    assert_eq!(
        eval1("[format('{0:D99}', 1)]")
            .unwrap()
            .as_str()
            .map(str::len),
        Some(99)
    );
    let zeros = "0".repeat(20_000);
    let e = eval_err(&format!("[format('{{0:{zeros}}}', 1)]"));
    assert!(e.contains("format string that is not valid"), "{e}");

    // Growth by repetition: the byte budget.
    let budget = "exceed the limit of '16777216' bytes";
    for expr in [
        // 16,384 × 16,384 characters.
        "[replace(padLeft('', 16384, 'a'), 'a', padLeft('', 16384, 'b'))]",
        "[join(range(0, 10000), padLeft('', 16384, 'b'))]",
        // 10,000 × 10,000 comparisons.
        "[length(union(range(0, 10000), range(10000, 10000)))]",
        "[length(intersection(range(0, 10000), range(0, 10000)))]",
    ] {
        let e = eval_err(expr);
        assert!(e.contains(budget), "{expr}: {e}");
    }
    // 327,680 empty strings out of 320 KB.
    let commas = vec!["padLeft('', 16384, ',')"; 20].join(", ");
    let e = eval_err(&format!("[length(split(concat({commas}), ','))]"));
    assert!(e.contains(budget), "{e}");
    // format's placeholders each repeating a long argument.
    let e = eval_err(&format!(
        "[format('{}', padLeft('', 16384, 'a'))]",
        "{0}".repeat(2_000)
    ));
    assert!(e.contains(budget), "{e}");

    // 24 variables doubling the previous one (1.5 KB of template, 920 MB before).
    let mut vars = Map::new();
    vars.insert("v00".into(), json!("xxxxxxxxxxxxxxxx"));
    for i in 1..30 {
        vars.insert(
            format!("v{i:02}"),
            json!(format!(
                "[concat(variables('v{0:02}'), variables('v{0:02}'))]",
                i - 1
            )),
        );
    }
    let e = err(&with_variables(Value::Object(vars)), json!({}));
    assert!(e.message.contains(budget), "{}", e.message);
    // The same with arrays.
    let mut vars = Map::new();
    vars.insert("v00".into(), json!([1, 2, 3, 4]));
    for i in 1..30 {
        vars.insert(
            format!("v{i:02}"),
            json!(format!(
                "[concat(variables('v{0:02}'), variables('v{0:02}'))]",
                i - 1
            )),
        );
    }
    let e = err(&with_variables(Value::Object(vars)), json!({}));
    assert!(e.message.contains(budget), "{}", e.message);
}

#[test]
fn integer_arithmetic_fails_on_overflow() {
    let overflow = "the result is outside the range of a 64-bit integer";
    for expr in [
        "[div(-9223372036854775808, -1)]",
        "[mod(-9223372036854775808, -1)]",
        "[add(9223372036854775807, 1)]",
        "[sub(-9223372036854775808, 1)]",
        "[mul(4611686018427387904, 2)]",
        "[range(9223372036854775807, 2)]",
    ] {
        let e = eval_err(expr);
        assert!(e.contains(overflow), "{expr}: {e}");
    }
    let e = eval_err("[substring('abc', 9223372036854775807, 1)]");
    assert!(
        e.contains("The index and length parameters must refer to a location within the string"),
        "{e}"
    );
    let e = eval_err("[substring('abc', 1, 9223372036854775807)]");
    assert!(
        e.contains("must refer to a location within the string"),
        "{e}"
    );
    assert_eq!(eval1("[div(7, -2)]").unwrap(), json!(-3));
    assert_eq!(eval1("[mod(-7, 2)]").unwrap(), json!(-1));
    assert_eq!(
        eval1("[add(9223372036854775806, 1)]").unwrap(),
        json!(i64::MAX)
    );

    // copyIndex's offset.
    let t = tpl(json!([{
        "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
        "apiVersion": "2023-01-31",
        "name": "[concat('id', copyIndex(9223372036854775807))]",
        "copy": {"name": "ids", "count": 2},
    }]));
    let e = err(&t, json!({}));
    assert!(e.message.contains(overflow), "{}", e.message);
}

fn identities(n: usize, loop_name: &str) -> Value {
    json!({
        "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
        "apiVersion": "2023-01-31",
        "name": format!("[concat('{loop_name}', copyIndex())]"),
        "location": "westus2",
        "copy": {"name": loop_name, "count": n},
    })
}

#[test]
fn arms_template_limits() {
    // Resources after copy expansion, nested children included.
    let with_child = |n: usize| {
        let mut r = identities(n, "a");
        r["resources"] = json!([{
            "type": "federatedIdentityCredentials",
            "apiVersion": "2023-01-31",
            "name": "fic",
            "dependsOn": ["[concat('a', copyIndex())]"],
            "properties": {"issuer": "https://i", "subject": "s", "audiences": ["x"]},
        }]);
        r
    };
    let plan = prep(&tpl(json!([with_child(400)])), json!({})).unwrap();
    assert_eq!(plan.resources.len(), 800);
    let e = err(
        &tpl(json!([with_child(400), identities(1, "b")])),
        json!({}),
    );
    assert_eq!(
        e.message,
        "Deployment template validation failed: 'The number of template resources limit exceeded. Limit: '800' and actual: '801'. Please see https://aka.ms/arm-template/#resources for usage details.'."
    );
    let e = err(
        &tpl(json!([identities(800, "a"), identities(800, "b")])),
        json!({}),
    );
    assert!(
        e.message.contains("Limit: '800' and actual: '1600'"),
        "{}",
        e.message
    );

    // Parameters, variables, outputs.
    let mut t = tpl(json!([]));
    let params: Map<String, Value> = (0..257)
        .map(|i| (format!("p{i}"), json!({"type": "int", "defaultValue": i})))
        .collect();
    t["parameters"] = Value::Object(params);
    let e = err(&t, json!({}));
    assert!(
        e.message.contains("The number of template parameters limit exceeded. Limit: '256' and actual: '257'. Please see https://aka.ms/arm-template/#parameters for usage details."),
        "{}",
        e.message
    );
    let mut t = tpl(json!([]));
    let mut vars: Map<String, Value> = (0..512).map(|i| (format!("v{i}"), json!(i))).collect();
    assert!(prep(&with_variables(Value::Object(vars.clone())), json!({})).is_ok());
    vars.insert(
        "copy".into(),
        json!([{"name": "more", "count": 800, "input": "[copyIndex('more')]"}]),
    );
    t["variables"] = Value::Object(vars);
    let e = err(&t, json!({}));
    assert!(
        e.message.contains("Limit: '512' and actual: '513'"),
        "{}",
        e.message
    );
    let mut t = tpl(json!([]));
    let outputs: Map<String, Value> = (0..65)
        .map(|i| (format!("o{i}"), json!({"type": "int", "value": i})))
        .collect();
    t["outputs"] = Value::Object(outputs);
    let e = err(&t, json!({}));
    assert!(
        e.message.contains(
            "The number of template outputs limit exceeded. Limit: '64' and actual: '65'."
        ),
        "{}",
        e.message
    );
}

#[test]
fn many_dependencies_resolve_in_linear_work() {
    // 400 resources each depending on a 400-instance loop, every entry named 1,000 times over
    // (by loop name, by name, by id): 160,000 edges, each kept once.
    let mut dependent = identities(400, "b");
    let mut entries = vec![json!("a"); 1_000];
    entries.push(json!(
        "[resourceId('Microsoft.ManagedIdentity/userAssignedIdentities', 'a7')]"
    ));
    entries.push(json!("a7"));
    dependent["dependsOn"] = Value::Array(entries);
    let t = tpl(json!([identities(400, "a"), dependent]));
    let start = std::time::Instant::now();
    let plan = prep(&t, json!({})).unwrap();
    eprintln!(
        "prepare: 800 resources, 160,000 edges: {:?}",
        start.elapsed()
    );
    assert_eq!(plan.resources.len(), 800);
    for r in &plan.resources[400..] {
        assert_eq!(r.depends_on, (0..400).collect::<Vec<_>>());
    }
}

fn outer_nested(value_expr: &str) -> Value {
    json!({
        "type": "Microsoft.Resources/deployments",
        "apiVersion": "2022-09-01",
        "name": "outer",
        "properties": {
            "mode": "Incremental",
            "expressionEvaluationOptions": {"scope": "outer"},
            "template": {
                "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
                "contentVersion": "1.0.0.0",
                "resources": [{
                    "type": "Microsoft.KeyVault/vaults/secrets",
                    "apiVersion": "2023-07-01",
                    "name": "kv1/s1",
                    "properties": {
                        "value": value_expr,
                        "guid": "[guid('a')]",
                        "literal": "[[x",
                        "tags": {"[concat('[', 'k')]": "[createArray('[y]')]"},
                    },
                }],
            },
        },
    })
}

#[test]
fn outer_scope_results_are_literals_in_the_nested_deployment() {
    let mut t = tpl(json!([outer_nested("[parameters('secret')]")]));
    t["parameters"] = json!({"secret": {"type": "securestring"}});
    let secret = "[notAFunction('s')]";
    let plan = prep(&t, json!({"secret": {"value": secret}})).unwrap();
    let body = plan.body(0, &NoReferences).unwrap();
    let nested = &body["properties"]["template"];
    // What the nested deployment would run: its own prepare and body, as the engine does.
    let inner = prep(nested, json!({})).unwrap();
    let b = inner.body(0, &NoReferences).unwrap();
    assert_eq!(b["properties"]["value"], json!(secret));
    assert_eq!(b["properties"]["guid"], json!(hash::guid(&["a"])));
    assert_eq!(b["properties"]["literal"], json!("[x"));
    assert_eq!(b["properties"]["tags"], json!({"[k": ["[y]"]}));
}

#[test]
fn secure_values_are_not_quoted_in_errors() {
    let secret = "hunter2-very-secret";
    let mut t = tpl(json!([{
        "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
        "apiVersion": "2023-01-31",
        "name": "id1",
        "properties": {"v": "[int(parameters('s'))]"},
    }]));
    t["parameters"] = json!({"s": {"type": "securestring"}, "o": {"type": "secureObject"}});
    let given = json!({"s": {"value": secret}, "o": {"value": {"k": secret}}});
    for v in [
        "[int(parameters('s'))]",
        "[format(concat('{', parameters('s')), 1)]",
        "[parameters('o')[parameters('s')]]",
        "[createObject('a', 1)[parameters('s')]]",
        "['x'[parameters('s')]]",
    ] {
        t["resources"][0]["properties"]["v"] = json!(v);
        let e = err(&t, given.clone());
        assert!(!e.message.contains(secret), "{v}: {}", e.message);
    }
    // A secure parameter that breaks allowedValues or its type is not quoted either.
    let mut t = tpl(json!([]));
    t["parameters"] = json!({"s": {"type": "securestring", "allowedValues": ["a"]}});
    let e = err(&t, json!({"s": {"value": secret}}));
    assert!(!e.message.contains(secret), "{}", e.message);
    t["parameters"] = json!({"s": {"type": "secureObject"}});
    let e = err(&t, json!({"s": {"value": secret}}));
    assert!(!e.message.contains(secret), "{}", e.message);
}

#[test]
fn expansion_is_bounded() {
    on_small_stack(|| {
        // Child resources nested 40 levels (serde allows 63): refused at 16.
        let mut r = json!({"type": "c", "apiVersion": "1", "name": "n"});
        for _ in 0..40 {
            r = json!({"type": "c", "apiVersion": "1", "name": "n", "resources": [r]});
        }
        r["type"] = json!("Microsoft.X/a");
        let e = err(&tpl(json!([r])), json!({}));
        assert!(
            e.message
                .contains("nests child resources more than '16' levels deep"),
            "{}",
            e.message
        );
    });
    // 800 instances × a property copy of 800: 640,000 elements.
    let mut r = identities(800, "a");
    r["properties"] =
        json!({"copy": [{"name": "items", "count": 800, "input": "[copyIndex('items')]"}]});
    let e = err(&tpl(json!([r])), json!({}));
    assert!(
        e.message.contains("exceed the limit of '16777216' bytes"),
        "{}",
        e.message
    );
    // A variable copy of 800 each holding a property copy of 800.
    let t = with_variables(json!({"copy": [{
        "name": "v",
        "count": 800,
        "input": {"copy": [{"name": "p", "count": 800, "input": "[copyIndex('p')]"}]},
    }]}));
    let e = err(&t, json!({}));
    assert!(
        e.message.contains("exceed the limit of '16777216' bytes"),
        "{}",
        e.message
    );
    // What ARM accepts still plans: 800 instances with a property copy of 10.
    let mut r = identities(800, "a");
    r["properties"] =
        json!({"copy": [{"name": "items", "count": 10, "input": "[copyIndex('items')]"}]});
    let plan = prep(&tpl(json!([r])), json!({})).unwrap();
    assert_eq!(
        plan.body(799, &NoReferences).unwrap()["properties"]["items"],
        json!([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    );
}

#[test]
fn key_vault_references_are_found_checked_and_only_for_secure_parameters() {
    let t = json!({"$schema": "x", "contentVersion": "1.0.0.0", "resources": [], "parameters": {
        "Password": {"type": "securestring"}, "settings": {"type": "secureObject"},
        "plain": {"type": "string"}}});
    let vault = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/v";
    let refs = key_vault_references(&t, &json!({
        "password": {"reference": {"keyVault": {"id": vault}, "secretName": "pw"}},
        "settings": {"reference": {"keyVault": {"id": vault}, "secretName": "cfg", "secretVersion": "abc"}},
        "plain": {"value": "x"},
        "undeclared": {"reference": {"keyVault": {"id": vault}, "secretName": "pw"}},
    }))
    .unwrap();
    assert_eq!(
        refs,
        vec![
            KeyVaultReference {
                parameter: "password".into(),
                vault_id: vault.into(),
                secret_name: "pw".into(),
                secret_version: None,
                object: false
            },
            KeyVaultReference {
                parameter: "settings".into(),
                vault_id: vault.into(),
                secret_name: "cfg".into(),
                secret_version: Some("abc".into()),
                object: true
            },
        ]
    );
    // a plain string parameter would echo the vault's value: refused
    let e = key_vault_references(
        &t,
        &json!({"plain": {"reference": {"keyVault": {"id": vault}, "secretName": "pw"}}}),
    )
    .unwrap_err();
    assert_eq!(
        (e.code, e.target.as_deref()),
        ("InvalidTemplate", Some("parameters.plain"))
    );
    assert!(
        e.message.contains("'securestring' or 'secureobject'"),
        "{}",
        e.message
    );
    for bad in [
        json!({"reference": {"secretName": "pw"}}),
        json!({"reference": {"keyVault": {"id": vault}}}),
        json!({"reference": {"keyVault": {"id": vault}, "secretName": " "}}),
        json!({"reference": {"keyVault": {"id": vault}, "secretName": "pw", "secretVersion": 3}}),
    ] {
        let e = key_vault_references(&t, &json!({"password": bad})).unwrap_err();
        assert!(e.message.contains("is not valid"), "{bad}: {}", e.message);
    }
}

#[test]
fn lambda_functions_and_items_evaluate_like_arm() {
    let cases: Vec<(&str, Value)> = vec![
        ("[filter(createArray(1, 5, 3), lambda('x', greater(lambdaVariables('x'), 2)))]", json!([5, 3])),
        ("[filter(createArray('a', 'b', 'c'), lambda('x', 'i', not(equals(lambdaVariables('i'), 1))))]", json!(["a", "c"])),
        ("[map(createArray(1, 2), lambda('x', mul(lambdaVariables('x'), 10)))]", json!([10, 20])),
        ("[map(createArray(createObject('name', 'a'), createObject('name', 'b')), lambda('d', lambdaVariables('d').name))]", json!(["a", "b"])),
        ("[map(createArray('a', 'b'), lambda('x', 'i', concat(lambdaVariables('x'), string(lambdaVariables('i')))))]", json!(["a0", "b1"])),
        ("[reduce(createArray(1, 2, 3), 0, lambda('cur', 'next', add(lambdaVariables('cur'), lambdaVariables('next'))))]", json!(6)),
        ("[sort(createArray(3, 1, 2, 1), lambda('a', 'b', less(lambdaVariables('a'), lambdaVariables('b'))))]", json!([1, 1, 2, 3])),
        ("[toObject(createArray(createObject('name', 'a', 'v', 1)), lambda('e', lambdaVariables('e').name), lambda('e', lambdaVariables('e').v))]", json!({"a": 1})),
        ("[toObject(createArray(createObject('name', 'a')), lambda('e', lambdaVariables('e').name))]", json!({"a": {"name": "a"}})),
        ("[mapValues(createObject('a', 1, 'b', 2), lambda('v', mul(lambdaVariables('v'), 2)))]", json!({"a": 2, "b": 4})),
        ("[groupBy(createArray('apple', 'avocado', 'banana'), lambda('x', substring(lambdaVariables('x'), 0, 1)))]", json!({"a": ["apple", "avocado"], "b": ["banana"]})),
        ("[concat('https://kv1', environment().suffixes.keyvaultDns)]", json!("https://kv1.vault.localhost:8443")),
        ("[items(createObject('b', 2, 'a', 1))]", json!([{"key": "a", "value": 1}, {"key": "b", "value": 2}])),
        // an inner lambda sees the outer one's variables; its own hide them
        ("[map(createArray(1, 2), lambda('x', map(createArray(10), lambda('y', add(lambdaVariables('x'), lambdaVariables('y'))))))]", json!([[11], [12]])),
        ("[map(createArray(1), lambda('x', map(createArray(7), lambda('x', lambdaVariables('x')))))]", json!([[7]])),
    ];
    for (expr, want) in cases {
        assert_eq!(
            eval1(expr).unwrap_or_else(|e| panic!("{expr}: {}", e.message)),
            want,
            "{expr}"
        );
    }
    // an order that is none (always "before"): an answer, not a panic
    let v = eval1("[sort(createArray(3, 1, 2, 5, 4), lambda('a', 'b', true()))]").unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(5));
    let errors = [
        ("[lambda('x', 1)]", "is not expected at this location"),
        (
            "[lambdaVariables('x')]",
            "The lambda variable 'x' is not found",
        ),
        ("[map(createArray(1), 'x')]", "expects a lambda function"),
        (
            "[filter(createArray(1), lambda('x', 1))]",
            "expects its parameter to be of type 'Boolean'",
        ),
        (
            "[reduce(createArray(1), 0, lambda('a', 1))]",
            "must take 2 to 3 variable(s) while 1 were provided",
        ),
        (
            "[map(createArray(1), lambda(1, 2))]",
            "must be non-empty string literals",
        ),
        (
            "[mapValues(createArray(1), lambda('v', 1))]",
            "type 'Object'",
        ),
        ("[items(createArray(1))]", "type 'Object'"),
    ];
    for (expr, want) in errors {
        let e = eval1(expr).unwrap_err();
        assert_eq!(e.code, "InvalidTemplate", "{expr}");
        assert!(e.message.contains(want), "{expr}: {}", e.message);
    }
}

#[test]
fn an_expression_that_reads_a_secure_value_fails_without_quoting_it() {
    // prepare (a name), a variable, a resource body: each failing expression computed from the
    // secret would quote what it computed; none does
    let mut t = tpl(json!([{
        "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
        "apiVersion": "2023-01-31",
        "name": "id1",
        "properties": {"v": "[reference(parameters('pw')).x]"},
    }]));
    t["parameters"] = json!({"pw": {"type": "securestring"}});
    let params = json!({"pw": {"value": "hunter2secret"}});
    let e = prep(&t, params.clone()).unwrap_err();
    assert!(!e.message.contains("hunter2"), "{}", e.message);
    assert!(e.message.contains("withheld"), "{}", e.message);
    t["resources"][0]["properties"]["v"] = json!("[variables('v')]");
    t["variables"] = json!({"v": "[createObject('a', parameters('pw')).b]"});
    let e = prep(&t, params.clone()).unwrap_err();
    assert!(
        !e.message.contains("hunter2") && e.message.contains("withheld"),
        "{}",
        e.message
    );
    // the same failure without a secure value keeps its message
    t["parameters"] = json!({"pw": {"type": "string"}});
    let e = prep(&t, params).unwrap_err();
    assert!(e.message.contains("doesn't exist"), "{}", e.message);
}

#[test]
fn date_uri_data_and_collection_functions_evaluate_like_arm() {
    let cases: Vec<(&str, Value)> = vec![
        // ARM's own examples (P1Y is 365 days, P1M 30)
        (
            "[dateTimeAdd('2023-01-01 00:00:00Z', 'P1Y')]",
            json!("2024-01-01T00:00:00Z"),
        ),
        (
            "[dateTimeAdd('2024-01-01 00:00:00Z', 'P1Y')]",
            json!("2024-12-31T00:00:00Z"),
        ),
        (
            "[dateTimeAdd('2023-02-01 00:00:00Z', 'P1M')]",
            json!("2023-03-03T00:00:00Z"),
        ),
        (
            "[dateTimeAdd('2024-02-01 00:00:00Z', 'P1M')]",
            json!("2024-03-02T00:00:00Z"),
        ),
        (
            "[dateTimeAdd('2020-04-07 14:53:14Z', '-PT1H', 'yyyy-MM-dd HH:mm')]",
            json!("2020-04-07 13:53"),
        ),
        (
            "[dateTimeAdd('20200407T145314Z', 'PT10M')]",
            json!("20200407T150314Z"),
        ),
        (
            "[dateTimeFromEpoch(1683040573)]",
            json!("2023-05-02T15:16:13Z"),
        ),
        (
            "[dateTimeToEpoch('2023-05-02T15:16:13Z')]",
            json!(1683040573),
        ),
        (
            "[uri('http://contoso.com/resources/', 'nested/azuredeploy.json')]",
            json!("http://contoso.com/resources/nested/azuredeploy.json"),
        ),
        ("[uriComponent('a b/c')]", json!("a%20b%2Fc")),
        ("[uriComponentToString('a%20b%2Fc')]", json!("a b/c")),
        (
            "[dataUri('Hello')]",
            json!("data:text/plain;charset=utf8;base64,SGVsbG8="),
        ),
        (
            "[dataUriToString('data:;base64,SGVsbG8sIFdvcmxkIQ==')]",
            json!("Hello, World!"),
        ),
        ("[base64ToJson(base64('{\"a\": [1]}'))]", json!({"a": [1]})),
        ("[array('x')]", json!(["x"])),
        ("[array(createArray(1))]", json!([1])),
        (
            "[flatten(createArray(createArray(1, 2), createArray(3)))]",
            json!([1, 2, 3]),
        ),
        (
            "[shallowMerge(createArray(createObject('a', 1, 'b', 1), createObject('b', 2)))]",
            json!({"a": 1, "b": 2}),
        ),
        (
            "[tryGet(createObject('a', createObject('b', 1)), 'a', 'b')]",
            json!(1),
        ),
        ("[tryGet(createObject('a', 1), 'nope')]", Value::Null),
        ("[tryGet(createArray(5, 6), 1)]", json!(6)),
        (
            "[objectKeys(createObject('a', 1, 'b', 2))]",
            json!(["a", "b"]),
        ),
    ];
    for (expr, want) in cases {
        assert_eq!(
            eval1(expr).unwrap_or_else(|e| panic!("{expr}: {}", e.message)),
            want,
            "{expr}"
        );
    }
    for (expr, want) in [
        ("[dateTimeAdd('yesterday', 'P1D')]", "ISO 8601"),
        (
            "[dateTimeAdd('2020-01-01', '1 day')]",
            "duration in ISO 8601",
        ),
        ("[dateTimeFromEpoch(-1)]", "outside 1970-01-01"),
        ("[flatten(createArray(1))]", "type 'Array'"),
        ("[dataUriToString('hello')]", "expects a data URI"),
    ] {
        let e = eval1(expr).unwrap_err();
        assert!(e.message.contains(want), "{expr}: {}", e.message);
    }
}

#[test]
fn what_is_computed_from_a_secure_parameter_is_secure_too() {
    let mut t = tpl(json!([{
        "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
        "apiVersion": "2023-01-31",
        "name": "id1",
        "tags": {"copied": "[parameters('copy')]"},
        "properties": {"n": "[length(createArray(1))]"},
    }]));
    t["parameters"] = json!({"pw": {"type": "securestring"}, "obj": {"type": "secureObject"},
        "copy": {"type": "string", "defaultValue": "[concat('x', parameters('pw'))]"}});
    let params = json!({"pw": {"value": "hunter2secret"}, "obj": {"value": {"pin": 98765}}});
    // a default computed from a secure parameter is masked where shown
    let plan = prep(&t, params.clone()).unwrap();
    let shown = plan.body_shown(0, &NoReferences).unwrap();
    assert_eq!(shown["tags"]["copied"], SECURE_MASK, "{shown}");
    // a copy count computed from one is not quoted when refused
    t["resources"][0]["copy"] = json!({"name": "c", "count": "[parameters('obj').pin]"});
    t["resources"][0]["name"] = json!("[concat('id', copyIndex())]");
    let e = prep(&t, params).unwrap_err();
    assert!(!e.message.contains("98765"), "{}", e.message);
}

#[test]
fn a_lambdas_variables_are_charged_each_time_its_body_sees_them() {
    // the 2 MiB value is in scope of 20 inner bodies: 40 MiB copied, over the 16 MiB budget
    // (uncharged, each copy was free and a large value times many calls ran for minutes)
    let mut t = tpl(json!([{
        "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
        "apiVersion": "2023-01-31",
        "name": "id1",
        "properties": {"v": "[map(createArray(parameters('big')), lambda('s', map(range(0, 20), lambda('j', 1))))]"},
    }]));
    t["parameters"] = json!({"big": {"type": "string"}});
    let big = "x".repeat(2 * 1024 * 1024);
    // validation evaluates the body already: refused there
    let e = prep(&t, json!({"big": {"value": big}})).unwrap_err();
    assert!(e.message.contains("exceed the limit"), "{}", e.message);
    // a small value in scope of the same calls is fine
    assert_eq!(
        prep(&t, json!({"big": {"value": "small"}}))
            .unwrap()
            .body(0, &NoReferences)
            .unwrap()["properties"]["v"][0]
            .as_array()
            .map(Vec::len),
        Some(20)
    );
}

#[test]
fn the_dependency_order_puts_each_resource_after_what_it_depends_on() {
    let id = |name: &str, deps: Value| {
        json!({"type": "Microsoft.ManagedIdentity/userAssignedIdentities", "apiVersion": "2023-01-31",
            "name": name, "dependsOn": deps})
    };
    // c → b → a, d → a (listed twice), e alone; written out of order
    let t = tpl(json!([
        id("c", json!(["b"])),
        id("d", json!(["a", "a"])),
        id("b", json!(["a"])),
        id("e", json!([])),
        id("a", json!([])),
    ]));
    let plan = prep(&t, json!({})).unwrap();
    let order = plan.dependency_order();
    assert_eq!(order.len(), plan.resources.len());
    let pos = |i: usize| order.iter().position(|&x| x == i).unwrap();
    for (i, r) in plan.resources.iter().enumerate() {
        for &d in &r.depends_on {
            assert!(pos(d) < pos(i), "{order:?}");
        }
    }
}
