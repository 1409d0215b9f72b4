//! Authentication: modes none / static token / JWT (jsonwebtoken on a ring
//! crypto provider). Being written; not wired into connections yet.
