//! [`Factory`]: the conformance suite's [`StoreFactory`] for the kit's
//! backends, over an [`Isolation`]. A backend's test target adds only what
//! that backend alone can do ([`Hooks`]: corrupt a stored record, apply a
//! transition inside one of its transactions).
//!
//! ```no_run
//! use idem_testkit::{BackendKind, Factory, Hooks};
//!
//! struct Sqlite;
//! impl Hooks for Sqlite {
//!     type Store = idem_sqlite::SqliteStore;
//! }
//!
//! idem_conformance::conformance_main!(Factory::new(BackendKind::Sqlite, Sqlite));
//! ```

use async_trait::async_trait;
use idem_core::store::Store;
use idem_core::{Error, RecordKey, Transition};
use idem_postgres::PostgresStore;
use idem_redis::RedisStore;
use idem_sqlite::SqliteStore;
use idemkit::{AnyStore, StoreUrl};

use crate::runner::{StoreFactory, TransactionEnd};
use crate::{BackendKind, Isolation, Unavailable};

/// A store of a concrete type that the kit isolates.
pub trait KitStore: Store + Clone + Sized + 'static {
    /// This store inside `any`, if `any` is of this type.
    fn of(any: &AnyStore) -> Option<Self>;

    /// Where its records live, as [`Isolated::place`](crate::Isolated::place)
    /// names it: the SQLite file, the schema, the key prefix.
    fn place(&self) -> String;
}

impl KitStore for SqliteStore {
    fn of(any: &AnyStore) -> Option<Self> {
        any.as_sqlite().cloned()
    }
    fn place(&self) -> String {
        self.path()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }
}

impl KitStore for PostgresStore {
    fn of(any: &AnyStore) -> Option<Self> {
        any.as_postgres().cloned()
    }
    fn place(&self) -> String {
        self.table().schema().to_string()
    }
}

impl KitStore for RedisStore {
    fn of(any: &AnyStore) -> Option<Self> {
        any.as_redis().cloned()
    }
    fn place(&self) -> String {
        self.prefix().to_string()
    }
}

/// What one backend's [`Factory`] adds to the kit's isolated stores: the
/// [`StoreFactory`] methods only that backend can implement. Each defaults
/// to "not offered" (the suite then does not register the cases needing it).
#[async_trait]
pub trait Hooks: Send + Sync + 'static {
    /// The store under test.
    type Store: KitStore;

    /// [`StoreFactory::can_corrupt`].
    fn can_corrupt(&self) -> bool {
        false
    }

    /// [`StoreFactory::corrupt`].
    async fn corrupt(&self, store: &Self::Store, key: &RecordKey) -> Result<(), Unavailable> {
        let _ = (store, key);
        Err(Unavailable("this backend cannot corrupt records".into()))
    }

    /// [`StoreFactory::can_apply_transition`].
    fn can_apply_transition(&self) -> bool {
        false
    }

    /// [`StoreFactory::apply_transition`].
    async fn apply_transition(
        &self,
        store: &Self::Store,
        transition: &Transition,
        end: TransactionEnd,
    ) -> Result<Result<(), Error>, Unavailable> {
        let _ = (store, transition, end);
        Err(Unavailable(
            "this backend does not apply transitions in a transaction".into(),
        ))
    }
}

/// The conformance [`StoreFactory`] of one backend of the kit.
///
/// # Behavior
/// - [`open`](StoreFactory::open) gives an [`Isolated`](crate::Isolated)
///   store (a file, schema or key prefix of its own), kept open by the
///   factory's [`Isolation`]; [`teardown`](StoreFactory::teardown) closes it
///   and removes its records; whatever is still open when the factory is
///   dropped (the end of the run) is removed then.
/// - [`reopen`](StoreFactory::reopen) is a second instance over the same
///   records with connections of its own.
/// - [`corrupt`](StoreFactory::corrupt) and
///   [`apply_transition`](StoreFactory::apply_transition) are the
///   backend's [`Hooks`].
#[derive(Debug)]
pub struct Factory<H> {
    name: &'static str,
    isolation: Isolation,
    hooks: H,
}

impl<H: Hooks> Factory<H> {
    /// Stores of `kind` on the server the environment names, reported as
    /// `kind`'s [name](BackendKind::name).
    pub fn new(kind: BackendKind, hooks: H) -> Self {
        Self {
            name: kind.name(),
            isolation: Isolation::new(kind),
            hooks,
        }
    }

    /// The same stores with other options (a claim mode, say), reported as
    /// `name`: `edit` changes the URL every store is opened with.
    #[must_use]
    pub fn with_options(mut self, name: &'static str, edit: impl FnOnce(&mut StoreUrl)) -> Self {
        self.name = name;
        self.isolation = self.isolation.with_options(edit);
        self
    }

    /// The URL every store is opened with (each in a place of its own).
    pub fn url(&self) -> Result<&StoreUrl, Unavailable> {
        self.isolation.url()
    }

    /// The backend's hooks.
    pub fn hooks(&self) -> &H {
        &self.hooks
    }

    /// A fresh isolated store opened with the factory's URL changed by
    /// `edit` (a table of another name, `migrate=false`, an expiry grace…);
    /// removed at the end of the run.
    pub async fn open_with(
        &self,
        edit: impl FnOnce(&mut StoreUrl),
    ) -> Result<H::Store, Unavailable> {
        let any = self.isolation.open_with(edit).await?;
        H::Store::of(&any).ok_or_else(|| Unavailable(format!("{}: not this store type", self.name)))
    }
}

#[async_trait]
impl<H: Hooks> StoreFactory for Factory<H> {
    type Store = H::Store;

    fn name(&self) -> &'static str {
        self.name
    }

    async fn open(&self) -> Result<H::Store, Unavailable> {
        self.open_with(|_| {}).await
    }

    async fn reopen(&self, store: &H::Store) -> Result<Option<H::Store>, Unavailable> {
        let any = self.isolation.reopen(&store.place()).await?;
        Ok(H::Store::of(&any))
    }

    async fn teardown(&self, store: &H::Store) -> Result<(), Unavailable> {
        self.isolation.close(&store.place()).await
    }

    fn can_corrupt(&self) -> bool {
        self.hooks.can_corrupt()
    }

    async fn corrupt(&self, store: &H::Store, key: &RecordKey) -> Result<(), Unavailable> {
        self.hooks.corrupt(store, key).await
    }

    fn can_apply_transition(&self) -> bool {
        self.hooks.can_apply_transition()
    }

    async fn apply_transition(
        &self,
        store: &H::Store,
        transition: &Transition,
        end: TransactionEnd,
    ) -> Result<Result<(), Error>, Unavailable> {
        self.hooks.apply_transition(store, transition, end).await
    }
}

/// Adds a backend's own cases, which apply to every backend
/// ([`Requires::Always`](crate::runner::Requires::Always)), to a
/// conformance suite: one `"name" => function` per case.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use idem_testkit::{BackendKind, Factory, Hooks};
/// # struct Sqlite;
/// # impl Hooks for Sqlite { type Store = idem_sqlite::SqliteStore; }
/// async fn opens(factory: Arc<Factory<Sqlite>>) { /* ... */ }
///
/// fn main() -> std::process::ExitCode {
///     let suite = idem_conformance::Suite::empty(Factory::new(BackendKind::Sqlite, Sqlite));
///     idem_testkit::cases!(suite; "store::opens" => opens).run()
/// }
/// ```
#[macro_export]
macro_rules! cases {
    ($suite:expr; $($name:literal => $run:path),* $(,)?) => {
        $suite$(.case($name, $crate::runner::Requires::Always, $run))*
    };
}
