//! Connection slots addressed by (index, generation), so that a completion for a slot that
//! was freed and reused is recognized as stale.

pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<usize>,
    len: usize,
}

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    pub fn insert(&mut self, value: T) -> (usize, u32) {
        self.len += 1;
        if let Some(i) = self.free.pop() {
            let slot = &mut self.slots[i];
            slot.generation = slot.generation.wrapping_add(1) & 0x00ff_ffff;
            slot.value = Some(value);
            return (i, slot.generation);
        }
        self.slots.push(Slot {
            generation: 0,
            value: Some(value),
        });
        (self.slots.len() - 1, 0)
    }

    pub fn get(&mut self, index: usize, generation: u32) -> Option<&mut T> {
        let slot = self.slots.get_mut(index)?;
        if slot.generation != generation {
            return None;
        }
        slot.value.as_mut()
    }

    pub fn generation(&self, index: usize) -> u32 {
        self.slots.get(index).map(|s| s.generation).unwrap_or(0)
    }

    pub fn remove(&mut self, index: usize) -> Option<T> {
        let v = self.slots.get_mut(index)?.value.take()?;
        self.free.push(index);
        self.len -= 1;
        Some(v)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Indices of live slots (a snapshot, so the caller may mutate while walking it).
    pub fn indices(&self) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.value.is_some())
            .map(|(i, _)| i)
            .collect()
    }

    pub fn at(&mut self, index: usize) -> Option<&mut T> {
        self.slots.get_mut(index)?.value.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_slot_has_a_new_generation() {
        let mut s = Slab::default();
        let (i, g) = s.insert("a");
        assert_eq!(s.get(i, g), Some(&mut "a"));
        s.remove(i);
        let (j, h) = s.insert("b");
        assert_eq!(i, j);
        assert_ne!(g, h);
        assert_eq!(s.get(i, g), None);
        assert_eq!(s.len(), 1);
    }
}
